"""Names shared by the coordinator and the sites: one place for every wire key."""

# Records in train/evaluate messages and their replies.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"
LEDGER = "ledger"

# ConfigRecord keys sent by the coordinator (plus the dotted config keys).
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
RUN_NAME = "run-name"
SEED = "seed"
ROUNDS = "rounds"
CPUS_PER_SITE = "federation.cpus_per_site"
UPDATE_ENCODING = "update-encoding"  # how the site encodes its update
LOCAL_NORM = "local-norm"  # FedBN: the site keeps its normalisation layers
# Secure aggregation protocol of the run ("secaggplus"), absent without one.
SECURE_AGGREGATION = "secure-aggregation"
# Ditto: weight of the pull of each site's personal model towards the global one.
DITTO_LAMBDA = "ditto-lambda"
# The personalisation step after the last round: its message action and local epochs.
PERSONALISE = "personalise"
PERSONALISE_EPOCHS = "personalise-epochs"
# Metric prefixes of a site's personal model vs the global one, on its held-out data.
PERSONAL_PREFIX = "personal-"
GLOBAL_PREFIX = "global-"
# Cross-site validation: the query for a site's own model, the evaluation of another's,
# and the site whose model is evaluated (absent: the global model, with local layers).
SITE_MODEL = "site_model"
CROSS_SITE = "cross_site"
CROSS_SITE_OWNER = "cross-site-owner"
# Evaluation-only runs: sites evaluate on all their labelled data (absent: held-out only).
ALL_DATA = "evaluation.all_data"
# Evaluation-only runs: digest of the weights to evaluate, part of the plan a site approves.
WEIGHTS_SHA256 = "weights-sha256"
# Under SecAgg+ (legacy FitIns, scalar values only) the site config travels as JSON here.
SITE_CONFIG_JSON = "medfed-site-config"

# ConfigRecord keys in a site's STATUS reply.
SITE = "site"
REFUSED = "refused"
DATASET = "dataset"  # the fingerprint of the data the site used (a hash of instance UIDs)
# Record and key of a site's reply to the data-quality query: aggregate summary as JSON.
QUALITY = "quality"
QUALITY_SUMMARY = "summary"
# ConfigRecord key in a site's LEDGER reply: the signed ledger entry as JSON.
LEDGER_ENTRY = "entry"
# Under SecAgg+ a site's status travels in the legacy FitRes metrics under these keys.
SECAGG_STATUS_PREFIX = "medfed."

# Metric names in a site's METRICS reply.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"  # the site's local training wall time
# When the site's local training started and finished (its clock, seconds since the epoch).
TRAIN_STARTED = "train-started"
TRAIN_FINISHED = "train-finished"
EVAL_LOSS = "eval-loss"
DICE = "dice"  # segmentation tasks
AUROC = "auroc"  # classification
BALANCED_ACCURACY = "balanced-accuracy"  # classification
EPSILON = "epsilon"
DELTA = "delta"
DP_STEPS = "dp-steps"
SAMPLE_RATE = "sample-rate"
NOISE_MULTIPLIER = "noise-multiplier"
# Equal weight per site: client-level DP aggregates sites uniformly.
UNIT_WEIGHT = "unit-weight"
# Client-level epsilon of the coordinator's central-DP releases.
CENTRAL_EPSILON = "central-epsilon"

# Flower run config (declared in pyproject's [tool.flwr.app.config]).
RUN_CONFIG_JSON = "medfed-config"

# Flower node config of a SuperNode (deployment) and of a simulated node.
NODE_SITE_NAME = "site-name"
NODE_DATA_PATH = "data-path"
NODE_STATE_DIR = "state-dir"
NODE_PARTITION_ID = "partition-id"
