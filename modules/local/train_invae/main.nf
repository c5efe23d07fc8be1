process TRAIN_INVAE {
    tag "$meta.id"
    label 'process_gpu'

    input:
    tuple val(meta), path(h5ad)

    output:
    tuple val(meta), path("${meta.id}_model")              , emit: model
    tuple val(meta), path("${meta.id}_training_history.csv"), emit: history
    path "versions.yml"                                    , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def device = task.ext.use_gpu ? 'cuda' : 'auto'
    """
    scinv_train.py \\
        --input ${h5ad} \\
        --model-dir ${meta.id}_model \\
        --history ${meta.id}_training_history.csv \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}

    scinv_versions.py "${task.process}" torch anndata safetensors > versions.yml
    """

    stub:
    """
    mkdir ${meta.id}_model
    touch ${meta.id}_training_history.csv
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
