/*
 * One sample: read and validate its counts, per-cell QC metrics, thresholds, scrublet. Every input
 * cell is kept in the output with its verdict (obs['qc_reason']); NORMALIZE drops the failed ones.
 */
process QC {
    tag "$meta.id"
    label 'process_single'

    input:
    tuple val(meta), path(counts, stageAs: 'input/*')
    path annotations

    output:
    tuple val(meta), path("${prefix}_qc.h5ad"), emit: h5ad
    path "versions.yml"                       , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    prefix   = task.ext.prefix ?: "${meta.id}"
    def ann  = annotations ? "--annotations ${annotations}" : ''
    // the sample's samplesheet row (obs columns, per-sample thresholds) travels in meta, so that
    // adding a sample to the sheet leaves the other samples' tasks cached on -resume
    def row  = groovy.json.JsonOutput.toJson(meta.row)
    """
    cat <<'SCINV_ROW' > sample_row.json
    ${row}
    SCINV_ROW

    scinv_qc.py \\
        --input '${counts}' \\
        --row sample_row.json \\
        --output ${prefix}_qc.h5ad \\
        ${ann} \\
        ${args}

    scinv_versions.py "${task.process}" scanpy anndata scikit-image > versions.yml
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    touch ${prefix}_qc.h5ad
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
