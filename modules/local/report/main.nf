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

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def tables = metrics instanceof List ? metrics : (metrics ? [metrics] : [])
    def metrics_arg = tables.collect { f -> f.name.endsWith('_label_transfer.csv') ? "--label-transfer ${f}" : "--metrics ${f}" }.join(' ')
    // the report lists every step's versions, its own included (they cannot reach the collected file it reads)
    """
    export MPLCONFIGDIR=\$PWD/.mpl
    scinv_versions.py "${task.process}" matplotlib pandas > versions.yml
    cat ${versions} versions.yml > all_versions.yml
    scinv_report.py \\
        --input ${h5ad} \\
        --output ${meta.id}_report.html \\
        --qc-cells ${qc_cells} \\
        --qc-summary ${qc_summary} \\
        --model-dir ${model} \\
        --versions all_versions.yml \\
        --params ${params_json} \\
        ${metrics_arg} \\
        ${args}
    """

    stub:
    def args = task.ext.args ?: ''
    """
    echo ${args}
    touch ${meta.id}_report.html
    printf '"%s":\\n    scinv: stub\\n' "${task.process}" > versions.yml
    """
}
