/*
 * Gather: the samples' kept cells and genes merged on disk, batch-aware HVGs by map-reduce,
 * normalize_total + log1p, PCA; one sample (or batch) in memory at a time (scinv.gather).
 * With a reference model (query mapping): the model's genes instead of HVGs, no PCA.
 */
process NORMALIZE {
    tag "$meta.id"
    label 'process_medium'

    input:
    tuple val(meta), path(samples, stageAs: 'samples/*')
    path reference_model  // a trained model directory, or [] to select HVGs

    output:
    tuple val(meta), path("${prefix}_normalized.h5ad")  , emit: h5ad
    tuple val(meta), path("${prefix}_qc_summary.csv")   , emit: summary
    tuple val(meta), path("${prefix}_qc_cells.parquet") , emit: cells
    path "versions.yml"                                 , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    prefix   = task.ext.prefix ?: "${meta.id}"
    def ref  = reference_model ? "--reference-model ${reference_model}" : ''
    """
    scinv_normalize.py \\
        --output ${prefix}_normalized.h5ad \\
        --summary ${prefix}_qc_summary.csv \\
        --cells ${prefix}_qc_cells.parquet \\
        ${ref} \\
        ${args} \\
        ${samples}

    scinv_versions.py "${task.process}" scanpy anndata scikit-misc > versions.yml
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}_normalized.h5ad ${prefix}_qc_summary.csv ${prefix}_qc_cells.parquet
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
