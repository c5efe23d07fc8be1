process QC {
    tag "$meta.id"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${meta.id}_qc.h5ad")          , emit: h5ad
    tuple val(meta), path("${meta.id}_qc_summary.csv")   , emit: summary
    tuple val(meta), path("${meta.id}_qc_cells.parquet") , emit: cells
    path "versions.yml"                                  , emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    scinv_qc.py \\
        --input ${h5ad} \\
        --output ${meta.id}_qc.h5ad \\
        --summary ${meta.id}_qc_summary.csv \\
        --cells ${meta.id}_qc_cells.parquet \\
        ${args}

    scinv_versions.py "${task.process}" scanpy anndata scikit-image > versions.yml
    """

    stub:
    """
    touch ${meta.id}_qc.h5ad ${meta.id}_qc_summary.csv ${meta.id}_qc_cells.parquet
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
