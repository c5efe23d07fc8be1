#!/usr/bin/env nextflow
/*
 * scinv: conditionally invariant VAE (inVAE) integration of single-cell data.
 *   nextflow run main.nf -profile test            (bundled example data)
 *   nextflow run main.nf --input samplesheet.csv --label_key cell_type --outdir results
 *   nextflow run main.nf --input query.csv --reference_model results/model/scinv_model --outdir query
 */
nextflow.enable.dsl = 2

include { SCINV                    } from './workflows/scinv'
include { PIPELINE_INITIALISATION  } from './subworkflows/local/utils_scinv'
include { helpText                 } from './subworkflows/local/utils_scinv'

workflow {
    if (params.help) {
        log.info helpText("${projectDir}/nextflow_schema.json")
        return
    }
    PIPELINE_INITIALISATION(params.input, params.annotations, params.reference_model)
    SCINV(
        PIPELINE_INITIALISATION.out.samples,
        PIPELINE_INITIALISATION.out.annotations,
        PIPELINE_INITIALISATION.out.reference,
        PIPELINE_INITIALISATION.out.versions,
    )
}

workflow.onComplete {
    if (workflow.success) {
        log.info "scinv finished: report at ${params.outdir}/report/${params.run_name}_report.html"
    } else {
        log.error "scinv failed: see the error above and ${workflow.workDir} (rerun with -resume once fixed)"
    }
}
