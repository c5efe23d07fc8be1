process REPORT {
    tag "$meta.id"
    label 'process_single'

    input:
    tuple val(meta), path(h5ad), path(qc_cells), path(qc_summary), path(model), path(metrics)
    path versions
    path params_json

    output:
    tuple val(meta), path("${meta.id}_report.html"), emit: html
    path "versions.yml"                            , emit: versions

    script:
    def args = task.ext.args ?: ''
    def tables = metrics instanceof List ? metrics : (metrics ? [metrics] : [])
    def metrics_arg = tables.collect { f -> f.name.endsWith('_label_transfer.csv') ? "--label-transfer ${f}" : "--metrics ${f}" }.join(' ')
    """
    export MPLCONFIGDIR=\$PWD/.mpl
    scinv_report.py \\
        --input ${h5ad} \\
        --output ${meta.id}_report.html \\
        --qc-cells ${qc_cells} \\
        --qc-summary ${qc_summary} \\
        --model-dir ${model} \\
        --versions ${versions} \\
        --params ${params_json} \\
        ${metrics_arg} \\
        ${args}

    scinv_versions.py "${task.process}" matplotlib pandas > versions.yml
    """

    stub:
    """
    touch ${meta.id}_report.html
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
