process METRICS {
    tag "$meta.id"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${meta.id}_metrics.csv"), emit: csv
    path "versions.yml"                            , emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    export NUMBA_CACHE_DIR=\$PWD/.numba_cache MPLCONFIGDIR=\$PWD/.mpl
    scinv_metrics.py \\
        --input ${h5ad} \\
        --output ${meta.id}_metrics.csv \\
        --n-jobs ${task.cpus} \\
        ${args}

    scinv_versions.py "${task.process}" scib-metrics jax pynndescent > versions.yml
    """

    stub:
    """
    touch ${meta.id}_metrics.csv
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
