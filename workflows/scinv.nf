/*
 * scinv: QC -> normalisation/HVG -> inVAE training -> export -> metrics -> report
 * With a reference model: QC -> the model's genes -> query mapping -> export (novelty) -> report
 */
include { QC          } from '../modules/local/qc/main'
include { NORMALIZE   } from '../modules/local/normalize/main'
include { TRAIN_INVAE } from '../modules/local/train_invae/main'
include { MAP_QUERY   } from '../modules/local/map_query/main'
include { EXPORT      } from '../modules/local/export/main'
include { METRICS     } from '../modules/local/metrics/main'
include { REPORT      } from '../modules/local/report/main'
include { BASELINE_HARMONY } from '../modules/local/baseline_harmony/main'
include { BASELINE_SCVI    } from '../modules/local/baseline_scvi/main'
include { BASELINE_SCANVI  } from '../modules/local/baseline_scanvi/main'

workflow SCINV {
    take:
    ch_samples   // channel: [meta, counts], one per sample (PIPELINE_INITIALISATION)
    annotations  // file or []: CSV joined to obs by cell_id
    reference_model  // model directory of a previous run (map the samples onto it), or [] (train)
    ch_versions  // channel: versions.yml of the initialisation

    main:
    def meta = [id: params.run_name]

    QC(ch_samples, annotations)
    ch_versions = ch_versions.mix(QC.out.versions)

    // gather in samplesheet order (deterministic, so -resume keeps NORMALIZE when nothing changed)
    ch_qc = QC.out.h5ad
        .toSortedList { a, b -> a[0].index <=> b[0].index }
        .map { samples -> [meta, samples.collect { it[1] }] }
    NORMALIZE(ch_qc, reference_model)
    ch_versions = ch_versions.mix(NORMALIZE.out.versions)

    def mapping = params.reference_model ? true : false  // reference_model: the checked folder
    if (mapping) {
        MAP_QUERY(NORMALIZE.out.h5ad, reference_model)
        ch_model = MAP_QUERY.out.model
        ch_versions = ch_versions.mix(MAP_QUERY.out.versions)
    } else {
        TRAIN_INVAE(NORMALIZE.out.h5ad)
        ch_model = TRAIN_INVAE.out.model
        ch_versions = ch_versions.mix(TRAIN_INVAE.out.versions)
    }

    EXPORT(NORMALIZE.out.h5ad.join(ch_model))
    ch_versions = ch_versions.mix(EXPORT.out.versions)

    // Reference integrations, each its own process so they run beside TRAIN_INVAE (not for a query)
    def baselines = mapping ? [] : (params.baselines ?: '').tokenize(',')*.trim()
    ch_baselines = Channel.empty()
    if ('harmony' in baselines) {
        BASELINE_HARMONY(NORMALIZE.out.h5ad)
        ch_baselines = ch_baselines.mix(BASELINE_HARMONY.out.embedding)
        ch_versions = ch_versions.mix(BASELINE_HARMONY.out.versions)
    }
    if ('scvi' in baselines) {
        BASELINE_SCVI(NORMALIZE.out.h5ad)
        ch_baselines = ch_baselines.mix(BASELINE_SCVI.out.embedding)
        ch_versions = ch_versions.mix(BASELINE_SCVI.out.versions)
    }
    if ('scanvi' in baselines) {
        BASELINE_SCANVI(NORMALIZE.out.h5ad)
        ch_baselines = ch_baselines.mix(BASELINE_SCANVI.out.embedding)
        ch_versions = ch_versions.mix(BASELINE_SCANVI.out.versions)
    }

    if (params.label_key && !params.skip_metrics && !mapping) {
        ch_metrics_in = EXPORT.out.h5ad
            .join(ch_baselines.groupTuple(), remainder: true)
            .map { m, h5ad, emb -> [m, h5ad, emb ?: []] }
        METRICS(ch_metrics_in)
        ch_versions = ch_versions.mix(METRICS.out.versions)
        ch_metrics = METRICS.out.csv
    } else {
        ch_metrics = EXPORT.out.h5ad.map { m, h5ad -> [m, []] }
    }

    // by content, sorted: the same file on every run (-resume keeps REPORT), whichever QC task came first
    ch_versions_file = ch_versions
        .map { it.text.trim() }
        .unique()
        .collectFile(name: 'software_versions.yml', storeDir: "${params.outdir}/pipeline_info", sort: true, newLine: true)
    ch_params = Channel.of(groovy.json.JsonOutput.prettyPrint(groovy.json.JsonOutput.toJson(params.findAll { k, v -> !(k in ['help']) })))
        .collectFile(name: 'params.json', storeDir: "${params.outdir}/pipeline_info")

    ch_report_in = EXPORT.out.h5ad
        .join(NORMALIZE.out.cells)
        .join(NORMALIZE.out.summary)
        .join(ch_model)
        .join(ch_metrics)
    REPORT(ch_report_in, ch_versions_file, ch_params)

    emit:
    h5ad   = EXPORT.out.h5ad
    report = REPORT.out.html
}
