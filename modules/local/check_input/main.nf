process CHECK_INPUT {
    tag "$meta.id"
    label 'process_single'

    input:
    tuple val(meta), path(input)
    path annotations

    output:
    tuple val(meta), path("${prefix}_samplesheet.valid.csv"), emit: samplesheet
    tuple val(meta), path("samples/*.h5ad")                , emit: split, optional: true
    path "versions.yml"                                    , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    prefix   = task.ext.prefix ?: "${meta.id}"
    def ann  = annotations ? "--annotations ${annotations}" : ''
    """
    scinv_check_input.py \\
        --input ${input} \\
        --output ${prefix}_samplesheet.valid.csv \\
        --split-dir samples \\
        --no-check-files \\
        ${ann} \\
        ${args}

    scinv_versions.py "${task.process}" anndata scanpy h5py > versions.yml
    """

    stub:  // the real check: it is quick, and the per-sample steps need its rows
    prefix  = task.ext.prefix ?: "${meta.id}"
    def ann = annotations ? "--annotations ${annotations}" : ''
    """
    scinv_check_input.py --input ${input} --output ${prefix}_samplesheet.valid.csv --split-dir samples --no-check-files ${ann} ${task.ext.args ?: ''}
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
