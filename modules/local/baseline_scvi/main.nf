process BASELINE_SCVI {
    tag "$meta.id"
    label 'process_gpu'

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${meta.id}_scvi.parquet"), emit: embedding
    path "versions.yml"                             , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def device = task.ext.use_gpu ? 'gpu' : 'auto'
    """
    export NUMBA_CACHE_DIR=\$PWD/.numba_cache MPLCONFIGDIR=\$PWD/.mpl
    scinv_baseline.py \\
        --method scvi \\
        --input ${h5ad} \\
        --output ${meta.id}_scvi.parquet \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}

    scinv_versions.py "${task.process}" scvi-tools torch anndata > versions.yml
    """

    stub:
    """
    touch ${meta.id}_scvi.parquet
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
