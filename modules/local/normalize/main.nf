process NORMALIZE {
    tag "$meta.id"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${meta.id}_normalized.h5ad"), emit: h5ad
    path "versions.yml"                                , emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    scinv_normalize.py \\
        --input ${h5ad} \\
        --output ${meta.id}_normalized.h5ad \\
        ${args}

    scinv_versions.py "${task.process}" scanpy anndata scikit-misc > versions.yml
    """

    stub:
    """
    touch ${meta.id}_normalized.h5ad
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
