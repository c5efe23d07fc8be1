process CHECK_INPUT {
    tag "$meta.id"
    label 'process_single'

    input:
    tuple val(meta), path(input), path(sample_files, stageAs: 'inputs/?/*')
    path annotations

    output:
    tuple val(meta), path("${meta.id}_merged.h5ad"), emit: h5ad
    path "versions.yml"                             , emit: versions

    script:
    def args = task.ext.args ?: ''
    def ann  = annotations ? "--annotations ${annotations}" : ''
    """
    scinv_check_input.py \\
        --input ${input} \\
        --output ${meta.id}_merged.h5ad \\
        --staged-dir inputs \\
        ${ann} \\
        ${args}

    scinv_versions.py "${task.process}" anndata scanpy h5py > versions.yml
    """

    stub:
    """
    touch ${meta.id}_merged.h5ad
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
