/*
 * Parameter validation and --help from nextflow_schema.json, without plugins (nf-schema cannot be
 * downloaded on offline clusters). Covers what users trip over: unknown parameters (typos),
 * types, enums, patterns, bounds, required values and files that must exist.
 */
import groovy.json.JsonSlurper

include { CHECK_INPUT } from '../../../modules/local/check_input/main'

/*
 * Validate the parameters, check that the samplesheet's files exist, and parse --input once into
 * a channel of [meta, counts], one per sample (CHECK_INPUT validates the sheet, or splits a single
 * .h5ad by sample). meta: id (sample), index (row), prefix (file-safe id), row (its samplesheet
 * values: obs columns and per-sample thresholds).
 */
workflow PIPELINE_INITIALISATION {
    take:
    input            // string: --input, a samplesheet CSV or an .h5ad
    annotations      // string or null: --annotations
    reference_model  // string or null: --reference_model (query mapping)

    main:
    validateParameters("${projectDir}/nextflow_schema.json")
    logLocalCaps()
    def model_dir = reference_model ? checkReferenceModel(reference_model) : []
    def sheet = file(input, checkIfExists: true)
    checkSampleFiles(sheet)
    def ann = annotations ? file(annotations, checkIfExists: true) : []
    CHECK_INPUT(Channel.of([[id: params.run_name], sheet]), ann)
    ch_samples = CHECK_INPUT.out.samplesheet.flatMap { meta, valid -> samplesFrom(valid, sheet) }

    emit:
    samples     = ch_samples                 // channel: [meta, counts]
    annotations = ann                        // file or []
    reference   = model_dir                  // model directory or [] (train from scratch)
    versions    = CHECK_INPUT.out.versions   // channel: versions.yml
}

/*
 * --reference_model must be a model directory a scinv run wrote (config.json and weights).
 */
def checkReferenceModel(String given) {
    def dir = file(given)
    if (!dir.exists()) error("ERROR: --reference_model ${given}: not found; pass the model folder of a scinv run (<outdir>/model/<run>_model)")
    if (!dir.resolve('config.json').exists() || !dir.resolve('model.safetensors').exists()) {
        error("ERROR: --reference_model ${given}: not a scinv model directory (needs config.json and model.safetensors); pass <outdir>/model/<run>_model of a scinv run")
    }
    return dir
}

/*
 * A sample's counts as Nextflow should stage them: paths relative to the samplesheet's folder;
 * a 10x matrix.mtx(.gz) brings its folder (features and barcodes live beside it).
 */
def samplePath(sheet, String given) {
    def f = (given.startsWith('/') || given.contains('://')) ? file(given) : sheet.parent.resolve(given)
    return (f.name.endsWith('.mtx') || f.name.endsWith('.mtx.gz')) ? f.parent : f
}

/*
 * Stop before any task runs when a samplesheet row names a file that does not exist: one line
 * naming the sheet, the sample and the file. A sheet that does not parse is left to CHECK_INPUT.
 */
def checkSampleFiles(sheet) {
    if (!sheet.name.toLowerCase().endsWith('.csv')) return
    def rows
    try { rows = sheet.splitCsv(header: false) } catch (Exception e) { return }  // no header map: it refuses an empty column name (trailing commas)
    if (!rows) return
    def header = rows[0].collect { it?.toString()?.replace('\uFEFF', '')?.trim() }
    def (iSample, iPath) = [header.indexOf('sample'), header.indexOf('path')]
    if (iSample < 0 || iPath < 0) return
    rows.drop(1).each { row ->
        def sample = row.size() > iSample ? row[iSample]?.toString()?.trim() : null
        def given = row.size() > iPath ? row[iPath]?.toString()?.trim() : null
        if (!given || !sample) return
        def f = samplePath(sheet, given)
        if (!f.exists()) error("ERROR: ${sheet}: file for sample '${sample}' not found: ${f}; fix the path column")
    }
}

def samplesFrom(valid, sheet) {
    def rows = valid.splitCsv(header: true)
    def safe = rows.collect { it.sample.replaceAll(/[^A-Za-z0-9._-]/, '_') }
    rows.withIndex().collect { row, i ->
        def counts = row.keep_obs == 'True' ? valid.parent.resolve('samples').resolve(row.path) : samplePath(sheet, row.path)
        def prefix = safe.count(safe[i]) > 1 ? "${safe[i]}_${i + 1}" : safe[i]
        [[id: row.sample, index: i, prefix: prefix, row: row.findAll { k, v -> k != 'path' }], counts]
    }
}

def schemaProperties(String schemaPath) {
    def schema = new JsonSlurper().parse(new File(schemaPath))
    def props = [:]
    def required = []
    schema['$defs'].each { groupName, group ->
        group.properties.each { name, spec -> props[name] = spec + [group: group.title] }
        required.addAll(group.required ?: [])
    }
    return [props, required]
}

def typeOk(value, String type) {
    switch (type) {
        case 'integer': return value instanceof Integer || value instanceof Long || value instanceof BigInteger
        case 'number' : return value instanceof Number
        case 'boolean': return value instanceof Boolean
        case 'string' : return value instanceof CharSequence
        default       : return true
    }
}

def validateParameters(String schemaPath) {
    if (!params.validate_params) return
    def (props, required) = schemaProperties(schemaPath)
    def errors = []
    def camel = { String s -> s.replaceAll(/_([a-z])/) { all, c -> c.toUpperCase() } }
    def known = props.keySet() + props.keySet().collect { camel(it) }
    params.each { name, value ->
        if (!(name in known)) {
            log.warn "Unknown parameter --${name} (typo?); see --help"
        }
    }
    required.each { name ->
        if (params[name] == null || params[name] == '') errors << "--${name} is required (${props[name].description})"
    }
    props.each { name, spec ->
        def value = params[name]
        if (value == null || value == '') return
        if (!typeOk(value, spec.type)) {
            errors << "--${name} must be a ${spec.type}, got '${value}'"
            return
        }
        if (spec.enum && !(value in spec.enum)) errors << "--${name} must be one of ${spec.enum.join(', ')}; got '${value}'"
        if (spec.pattern && !(value.toString() ==~ spec.pattern)) errors << "--${name} '${value}' does not match ${spec.pattern}"
        if (spec.minimum != null && value < spec.minimum) errors << "--${name} must be >= ${spec.minimum}; got ${value}"
        if (spec.maximum != null && value > spec.maximum) errors << "--${name} must be <= ${spec.maximum}; got ${value}"
        if (spec.exclusiveMinimum != null && value <= spec.exclusiveMinimum) errors << "--${name} must be > ${spec.exclusiveMinimum}; got ${value}"
        if (spec.format == 'file-path' && !value.toString().contains('://') && !file(value.toString()).exists()) {
            errors << "--${name} file not found: ${value}"
        }
    }
    if (params.label_key && params.label_key == params.batch_key) {
        errors << "--label_key and --batch_key must differ (both '${params.batch_key}')"
    }
    if (params.heldout_batches && !params.label_key) {
        errors << "--heldout_batches needs --label_key (label transfer is scored against the labels)"
    }
    if (params.reference_model && (params.baselines || params.heldout_batches)) {
        log.warn "--reference_model maps the query onto a trained model: --baselines and --heldout_batches are not used"
    }
    if (!params.reference_model && (params.baselines ?: '').tokenize(',')*.trim().contains('scanvi') && !params.label_key) {
        errors << "--baselines scanvi needs --label_key (scANVI trains on the labels); drop scanvi or give --label_key"
    }
    if (errors) {
        errors.each { log.error "Invalid parameter: ${it}" }
        error("Parameter validation failed: ${errors.size()} problem(s), listed above. Run with --help to see all parameters.")
    }
}

/*
 * conf/base.config caps local tasks to the machine (fitHost); say so once, with the figures.
 */
def logLocalCaps() {
    def executor = session.config.navigate('process.executor') ?: 'local'
    if (executor != 'local') return
    def cpus = Runtime.runtime.availableProcessors()
    def memory = new nextflow.util.MemoryUnit(java.lang.management.ManagementFactory.operatingSystemMXBean.totalMemorySize as long)
    log.info "Local executor: task requests are capped to this machine's ${cpus} CPUs and ${memory} (--max_cpus/--max_memory cap lower)"
}

def helpText(String schemaPath) {
    def (props, required) = schemaProperties(schemaPath)
    def lines = [
        '',
        'scinv: inVAE integration of single-cell data',
        '',
        'Usage:',
        '  nextflow run main.nf -profile test --outdir results',
        '  nextflow run main.nf --input samplesheet.csv --label_key cell_type --outdir results -profile docker,gpu',
        '',
    ]
    props.groupBy { it.value.group }.each { group, entries ->
        lines << "${group}:"
        entries.each { name, spec ->
            def dflt = spec.containsKey('default') ? " [default: ${spec.default}]" : ''
            def req = name in required ? ' (required)' : ''
            def choices = spec.enum ? " {${spec.enum.join('|')}}" : ''
            lines << "  --${name.padRight(26)} ${spec.type}${choices}${req}  ${spec.description}${dflt}"
        }
        lines << ''
    }
    return lines.join('\n')
}
