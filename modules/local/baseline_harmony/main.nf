process BASELINE_HARMONY {
    tag "$meta.id"
    label 'process_low'

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${meta.id}_harmony.parquet"), emit: embedding
    path "versions.yml"                                , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    export NUMBA_CACHE_DIR=\$PWD/.numba_cache MPLCONFIGDIR=\$PWD/.mpl
    scinv_baseline.py \\
        --method harmony \\
        --input ${h5ad} \\
        --output ${meta.id}_harmony.parquet \\
        --threads ${task.cpus} \\
        ${args}

    scinv_versions.py "${task.process}" harmonypy anndata > versions.yml
    """

    stub:
    """
    touch ${meta.id}_harmony.parquet
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
