process METRICS {
    tag "$meta.id"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad), path(baseline_embeddings)

    output:
    tuple val(meta), path("${meta.id}_{metrics,label_transfer}.csv"), emit: csv
    path "versions.yml"                                            , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def baselines = baseline_embeddings ? "--baseline-embeddings ${(baseline_embeddings instanceof List ? baseline_embeddings : [baseline_embeddings]).join(',')}" : ''
    """
    export NUMBA_CACHE_DIR=\$PWD/.numba_cache MPLCONFIGDIR=\$PWD/.mpl
    scinv_metrics.py \\
        --input ${h5ad} \\
        --output ${meta.id}_metrics.csv \\
        --n-jobs ${task.cpus} \\
        ${baselines} \\
        ${args}

    scinv_versions.py "${task.process}" scib-metrics jax pynndescent scikit-learn > versions.yml
    """

    stub:
    """
    touch ${meta.id}_metrics.csv
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
