/*
 * Query mapping: the trained reference model extended to the query's batches (only their weights
 * train; encoder, decoder and invariant prior stay frozen), saved with the reference sample.
 */
process MAP_QUERY {
    tag "$meta.id"
    label 'process_gpu'

    input:
    tuple val(meta), path(h5ad)
    path reference_model

    output:
    tuple val(meta), path("${prefix}_query_model")              , emit: model
    tuple val(meta), path("${prefix}_mapping_history.csv"), emit: history
    path "versions.yml"                                   , emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args   = task.ext.args ?: ''
    prefix     = task.ext.prefix ?: "${meta.id}"
    def device = task.ext.use_gpu ? 'cuda' : 'auto'
    """
    scinv_map.py \\
        --input ${h5ad} \\
        --reference-model ${reference_model} \\
        --model-dir ${prefix}_query_model \\
        --history ${prefix}_mapping_history.csv \\
        --device ${device} \\
        --threads ${task.cpus} \\
        ${args}

    scinv_versions.py "${task.process}" torch anndata safetensors > versions.yml
    """

    stub:
    prefix = task.ext.prefix ?: "${meta.id}"
    """
    mkdir ${prefix}_query_model
    touch ${prefix}_mapping_history.csv
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
