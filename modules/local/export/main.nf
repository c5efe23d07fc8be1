process EXPORT {
    tag "$meta.id"
    label 'process_medium'

    input:
    tuple val(meta), path(h5ad), path(model)

    output:
    tuple val(meta), path("${meta.id}_integrated.h5ad")            , emit: h5ad
    tuple val(meta), path("${meta.id}_embeddings.parquet")    , emit: embeddings
    tuple val(meta), path("${meta.id}_cellxgene.h5ad")        , emit: cellxgene, optional: true
    path "versions.yml"                                       , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    scinv_export.py \\
        --input ${h5ad} \\
        --model-dir ${model} \\
        --output ${meta.id}_integrated.h5ad \\
        --embeddings ${meta.id}_embeddings.parquet \\
        ${args}

    scinv_versions.py "${task.process}" torch scanpy umap-learn pyarrow > versions.yml
    """

    stub:
    """
    touch ${meta.id}_integrated.h5ad ${meta.id}_embeddings.parquet
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
