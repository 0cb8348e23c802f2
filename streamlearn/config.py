"""The service's configuration: one TOML file, parsed once into one typed object.

Environment variables `STREAMLEARN_<SECTION>_<KEY>` override the file (for
models: `STREAMLEARN_MODELS_<NAME>_<KEY>`). Any error is raised as a
`ConfigError` whose message is one line naming the key and the problem.

>>> cfg = parse_config({"join": {"ttl": 60}}, env={"STREAMLEARN_JOIN_MAX_PENDING": "500"})
>>> cfg.join.ttl, cfg.join.max_pending
(60.0, 500)
>>> try:
...     parse_config({"join": {"ttl": -1}}, env={})
... except ConfigError as err:
...     print(err)
config error: join.ttl: Expected `float` > 0.0
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Mapping, Optional, Union

import msgspec

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Setting = Union[str, int, float, bool]

EWC_LAMBDA = 10.0  # the default ewc.lambda, chosen from the sweep in bench/forgetting.py (README)

# STREAMLEARN_ variables that are not settings: a secret read where it is used, and the crash tests'
# pause point inside a promotion (streamlearn/deploy/faults.py).
NON_SETTING_ENV = frozenset({"STREAMLEARN_SNAPSHOT_KEY", "STREAMLEARN_DEPLOY_PAUSE"})


class ConfigError(ValueError):
    """A configuration problem, already phrased as one line for the operator."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class KafkaConfig(_Section):
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "streamlearn"
    client: Literal["confluent-kafka", "kafka-python"] = "confluent-kafka"
    inference_topic: str = "inference-logs"
    feedback_topic: str = "feedback"
    examples_topic: str = "examples"          # "" to not consume pre-joined examples
    session_timeout_ms: PositiveInt = 10_000
    max_poll_interval_ms: PositiveInt = 300_000
    # How long the broker may hold the consumer's fetch that has no new data (the client's fetch.wait.max.ms /
    # fetch_max_wait_ms; unset: 100). Lower is fresher (README "Low latency"), at more fetch requests to the broker.
    fetch_wait_ms: Optional[PositiveInt] = None
    # Passed verbatim to the client (SASL/TLS and tuning), in that client's own key names.
    # A value "env:NAME" is read from the environment at start, so secrets stay out of the file.
    settings: dict[str, Setting] = {}


class JoinConfig(_Section):
    ttl: Positive = 3600.0          # seconds of event time a log waits for its feedback
    early_ttl: Positive = 300.0     # seconds of event time feedback waits for its log
    max_pending: PositiveInt = 1_000_000
    # Event-time seconds of disorder within a partition for which examples are still released in (ts, id) order
    # (Flink's forBoundedOutOfOrderness); every example waits this long more for the watermark.
    max_out_of_order: NonNegative = 0.0
    # No longer used: a partition stops holding the watermark when the broker says it is at its end, never after a
    # wall-clock timeout. Accepted so that older configs still load; setting it logs a warning.
    idle_timeout: Optional[Positive] = None


class IntakeConfig(_Section):
    mode: Literal["process", "inline"] = "process"  # decode+join on the other core, or in the learner's loop
    batch_size: PositiveInt = 1000                   # examples per hand-off to the learner
    max_wait: Positive = 0.05                        # seconds before a partial batch is handed off
    poll_records: PositiveInt = 2000
    max_message_bytes: PositiveInt = 1 << 20
    # Event-time seconds a partition may run ahead of the slowest one that still has input before it is paused
    # (resumed as that one catches up): memory during a catch-up is bounded by this, not by the backlog.
    # 600 (not 60) from bench/backlog.py: pausing throws the client's prefetch away; 60 s caught up 2-3x slower.
    max_ahead: Positive = 600.0
    # An event time more than this far ahead of the message's broker timestamp is refused (`schema`):
    # one absurd `ts` would otherwise carry its partition's watermark into the future and expire every pending join.
    max_future_seconds: Positive = 3600.0
    # Intake processes (Kafka, mode "process"): each reads the same partition numbers of every topic (co-partitioned
    # by request id) and joins them; the learner merges their examples in event time (`stream/fan_in.py`).
    processes: PositiveInt = 1


class TrainConfig(_Section):
    """How a torch model learns; River models with `learn_mode = "many"` use `batch_size` and `max_wait` (only)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Positive = 2e-3                   # with steps_per_batch = 3: what one pass needs (bench/forgetting.py)
    weight_decay: NonNegative = 0.0
    batch_size: PositiveInt = 32          # examples per micro-batch (before replay is mixed in)
    max_wait: Positive = 1.0              # event-time seconds: a partial micro-batch is learned before an
                                          # example this much newer than its oldest (and at the end of input)
    steps_per_batch: PositiveInt = 3      # gradient steps on each mixed micro-batch (a service sees each example once)
    max_classes: PositiveInt = 100        # output width: classes appear as the stream brings them
    # "er_ace" (classification): incoming rows' cross-entropy over the classes present among them only, replayed
    # rows' over every class seen (Caccia et al. 2022): new classes stop overwriting old ones (bench/forgetting.py).
    # "auto": er_ace for a classifier with replay, else cross-entropy (regression: squared error, always).
    loss: Literal["auto", "cross_entropy", "er_ace"] = "auto"
    # Logit replay (DER++, Buzzega et al. 2020; classification with replay): the buffer keeps each row's outputs as
    # learned, and this weight times their squared distance to a replayed row's outputs now joins the loss. 0: off.
    distill: NonNegative = 0.0


class EncoderConfig(_Section):
    """Feature dict -> vector columns of a torch model."""

    numeric_slots: PositiveInt = 256
    string_slots: PositiveInt = 256       # one-hot columns for the first name=value pairs seen
    hash_buckets: PositiveInt = 256       # shared by the name=value pairs after those


class ReplayConfig(_Section):
    kind: Literal["reservoir", "class_balanced", "time_decayed", "none"] = "reservoir"
    capacity: PositiveInt = 1000
    # share of replayed examples in a mixed batch: 2/3, two replayed rows per incoming one (bench/forgetting.py)
    ratio: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.667
    half_life: Positive = 1000.0          # time_decayed: examples until a replay weight halves


class TriggerConfig(_Section):
    """When an action fires; any condition that holds fires it, and each firing is counted by its reason."""

    every_examples: NonNegativeInt = 0     # after this many examples since the last firing (0: never)
    every_seconds: NonNegative = 0.0       # after this many seconds since the last firing (0: never)
    on_drift: bool = False                 # when a drift detector fires
    score_below: Optional[float] = None    # when the rolling prequential score falls below this (once per fall)


def _consolidation() -> TriggerConfig:
    return TriggerConfig(every_examples=1000, on_drift=True)


class EwcConfig(_Section):
    lam: NonNegative = msgspec.field(default=EWC_LAMBDA, name="lambda")   # 0 turns EWC off
    gamma: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9               # Fisher decay per consolidation
    consolidate: TriggerConfig = msgspec.field(default_factory=_consolidation)   # when the anchor moves


class CapabilityConfig(_Section):
    """A named held-out set of conversations a language model must keep answering (README "Language models")."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]   # a metric label: short, bounded
    path: str                              # JSONL, one {"messages": [...], "answer": "..."} per line
    # exact_match: share of answers generated (greedy) that equal the expected one (case and outer space aside);
    # contains: share of answers that mention the expected one as whole words (a key fact, however worded);
    # token_loss: minus the mean per-token loss of the expected answer (higher is better, as for every score)
    metric: Literal["exact_match", "contains", "token_loss"] = "exact_match"
    min_score: Optional[float] = None      # the gate rejects a candidate below it (None: no minimum)
    tolerance: NonNegative = 0.02          # ... or more than this below production's score


class LmConfig(_Section):
    """A language model learning from feedback (`kind = "lm"`): LoRA adapters on a base model, replay, EWC."""

    # A model folder or a .gguf file, "package:resource" (a file inside an installed package, found without
    # importing it) or "package.module:factory" (a callable returning (model, tokenizer)).
    base: str = ""
    lora_rank: PositiveInt = 8
    lora_alpha: Positive = 16.0
    lora_targets: list[str] = msgspec.field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: Positive = 5e-4
    batch_size: PositiveInt = 8          # new examples per step (replayed ones join them)
    micro_batch: PositiveInt = 4         # sequences per forward pass: a step accumulates gradients over them
    max_tokens: PositiveInt = 512        # per sequence: a longer conversation loses its oldest turns
    token_budget: PositiveInt = 4096     # tokens per step at most (new ones first); what is left waits (the lag)
    max_wait: Positive = 60.0            # event-time seconds: a partial step is learned before an example this much
                                         # newer than its oldest (and at the end of input)
    replay_size: NonNegativeInt = 1000   # conversations kept for replay (0: none)
    replay_ratio: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.5   # share of a step's sequences that are replayed
    topic_bits: Annotated[int, msgspec.Meta(ge=0, le=8)] = 4         # replay topics: 2**bits hashed-embedding buckets
    ewc_lambda: NonNegative = 0.0        # EWC on the adapter weights (0: off)
    ewc_gamma: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9
    consolidate_every: PositiveInt = 200   # examples learned between EWC consolidations
    evaluate_every: NonNegativeInt = 0     # examples learned between capability evaluations (0: at candidates only)
    max_new_tokens: PositiveInt = 48       # generated per answer when a capability is scored by exact match
    capabilities: list[CapabilityConfig] = []


class ModelConfig(_Section):
    model: str = "logreg"           # a built-in name or "package.module:factory"
    kind: Literal["auto", "river", "torch", "lm"] = "auto"   # auto: torch for "mlp", River otherwise
    task: Literal["classification", "regression"] = "classification"
    learn_mode: Literal["one", "many"] = "one"  # River: per example, or learn_many micro-batches
    window: PositiveInt = 1000      # examples in the rolling prequential window
    params: dict[str, Union[Setting, list[Setting]]] = {}  # keyword arguments for the factory
    # Feature values (and regression labels) of larger magnitude are dead-lettered `out_of_range`:
    # one such value can wipe a linear model or its scaler. Raise it for features such as epoch milliseconds.
    max_abs_feature: Positive = 1e9
    # An example the model raises on: "dead_letter" (counted, quarantined as `learn_error`, learning goes on)
    # or "fail" (the service stops cleanly at the last durable state, naming the error).
    on_error: Literal["dead_letter", "fail"] = "dead_letter"
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    encoder: EncoderConfig = msgspec.field(default_factory=EncoderConfig)
    replay: ReplayConfig = msgspec.field(default_factory=ReplayConfig)
    ewc: EwcConfig = msgspec.field(default_factory=EwcConfig)
    lm: LmConfig = msgspec.field(default_factory=LmConfig)

    @property
    def is_torch(self) -> bool:
        return self.kind == "torch" or (self.kind == "auto" and self.model == "mlp")

    @property
    def is_lm(self) -> bool:
        return self.kind == "lm"


class SnapshotConfig(TriggerConfig):
    """Snapshots: when (the trigger fields, and always at clean shutdown), where and how."""

    enabled: bool = True
    every_examples: NonNegativeInt = 100_000  # snapshot after this many examples learned ...
    every_seconds: NonNegative = 60.0         # ... or this many seconds, whichever comes first
    keep: PositiveInt = 5                    # newest snapshots kept; older ones are pruned
    max_age_seconds: Positive = 600.0        # /readyz fails when the newest good snapshot is older
    audit_log: str = ""                      # file of learned example ids, kept exact across restores
    # "fork": a copy-on-write child serializes and writes, the loop stalls for the fork only (Linux/macOS);
    # "inline": the loop serializes, a thread writes (the stall grows with the state).
    serialize: Literal["fork", "inline"] = "fork"


class PublishConfig(TriggerConfig):
    """Candidate versions for serving: when one is made (the trigger fields), and where versions are kept."""

    enabled: bool = False
    every_examples: NonNegativeInt = 100_000  # a candidate after this many examples of a model ...
    every_seconds: NonNegative = 3600.0       # ... or this many seconds (and, if set, on drift or a low score)
    registry: str = ""                        # SQLite file of versions; "" = STATE_DIR/registry.sqlite
    artifacts: str = ""                       # folder or fsspec URL of version artifacts; "" = STATE_DIR/artifacts
    topic: str = "model-updates"              # Kafka topic of promotions (file source: STATE_DIR/model-updates.jsonl)


class GateConfig(_Section):
    """When a candidate may replace production. Scores are accuracies (regression: minus the MAE)."""

    min_recent_score: Optional[float] = None       # on the recent held-out examples (None: no minimum)
    min_historical_score: Optional[float] = None   # mean over the probe sets of older segments
    min_shadow_score: Optional[float] = None       # on the examples scored side by side while it waited
    regression_tolerance: NonNegative = 0.02       # how far below production the candidate may score, on each
    holdout_every: NonNegativeInt = 20             # 1 in this many of a model's examples is held out (0: none)
    holdout_size: PositiveInt = 1000               # the most recent held-out examples the gate scores
    min_shadow_examples: NonNegativeInt = 1000     # examples scored side by side before the gate decides
    # After a real concept change the drift policy confirmed, while production predates it (rule=concept_change):
    # probes and held-out examples from before the change no longer count; the candidate must have been made
    # after the change and beat production on recent and shadow examples by this margin.
    change_margin: NonNegative = 0.1               # how far above production the candidate must score, on each
    change_min_recent: NonNegativeInt = 30         # held-out examples since the change before it decides (waits)
    change_candidates: NonNegativeInt = 3          # candidates asked for at once from the confirmation (0: trigger only)


Share = Annotated[float, msgspec.Meta(gt=0, le=1)]


class PolicyConfig(_Section):
    """What a classifier does about a drift detection: which drift it is, and what to do (drift_actions_total).

    A detection opens a case; the next examples are judged against a reference copy of the model from
    before it. New classes (or inputs the reference is unsure of) keep what was learned; familiar inputs
    whose labels contradict the reference make a suspected change, confirmed if it persists.
    """

    enabled: bool = True               # false: a detection acts as before the policy (a torch model consolidates)
    judge_examples: PositiveInt = 200  # examples after a detection judged before the case is classified
    contradiction: Share = 0.3         # rise in the share of labels contradicting the reference: a suspected change
    new_class_share: Share = 0.3       # share of judged labels of classes first seen lately: new classes
    new_class_examples: PositiveInt = 2000   # "lately": within this many examples before the label
    confirm_examples: PositiveInt = 1000     # a suspected change is confirmed once it held this many examples ...
    # ... and this many seconds of event time since the detection: a burst of wrong labels shorter than this is
    # undone, never taken for a change (a broken labeler fixed within minutes; raise it where they last longer)
    confirm_seconds: NonNegative = 120.0
    reference_every: PositiveInt = 500       # examples between copies of the model kept as reference
    # What a suspected change does (undone if it ends as a burst) and a confirmed one keeps:
    release_ewc: bool = True           # torch: no EWC penalty while suspected; anchor, Fisher dropped when confirmed
    expire_replay: bool = True         # torch: replay rows older than the detection unused; dropped when confirmed
    reset_optimizer: bool = True       # torch: the optimizer's moments start afresh
    lr_boost: Annotated[float, msgspec.Meta(ge=1)] = 20.0   # torch: learning rate times this ...
    boost_examples: NonNegativeInt = 2000    # ... for this many examples from the suspicion (0: no boost)
    reset_river: bool = True           # River: learn on from a fresh copy of the model; the reference back on a burst


class DriftConfig(_Section):
    """Drift detection on every model's prequential error (drift_detected_total{model,detector})."""

    detectors: list[Literal["adwin", "page_hinkley"]] = msgspec.field(default_factory=lambda: ["adwin"])  # [] = off
    adwin_delta: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.002   # smaller: fewer, surer detections
    page_hinkley_delta: NonNegative = 0.005     # error increase tolerated before it accumulates
    page_hinkley_threshold: Positive = 50.0
    grace: PositiveInt = 30                     # examples before a detector may fire
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)   # [drift.policy]: which drift, what to do


class EvalConfig(_Section):
    """Live forgetting: held-out probes per segment of each model's stream, scored every `every` examples."""

    segment_size: PositiveInt = 10_000   # examples per segment of a model's stream
    probe_size: NonNegativeInt = 100     # examples of each segment held out as its probe set (0: none)
    every: PositiveInt = 10_000          # examples between evaluations (and history lines)
    segments: PositiveInt = 10           # the most recent complete segments whose probes are kept
    history: bool = True                 # append each evaluation to STATE_DIR/history.jsonl (for `report`)
    sample_every: NonNegativeInt = 100   # examples of a model between rolling-score samples in the history (0: none)
    history_max_mb: Positive = 64.0      # history.jsonl past this size becomes history.jsonl.1 (the one before goes)
    served_versions: PositiveInt = 5     # serving versions whose scores are kept per model (from inference logs)


class MetricsConfig(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: Port = 9108               # 0 picks a free port (tests)


class ClusterConfig(_Section):
    """Replicas of one service learning one model (issue 19, in progress): each reads a share of the partitions,
    and they average their models' parameters every `sync_every` seconds of event time (`streamlearn.cluster`)."""

    replicas: PositiveInt = 1
    rank: Optional[Annotated[int, msgspec.Meta(ge=0)]] = None   # None: the RANK environment variable (torchrun's)
    init_method: str = "env://"           # torch.distributed's rendezvous (env://: MASTER_ADDR, MASTER_PORT)
    sync_every: Positive = 60.0           # event-time seconds between parameter averages
    timeout: Positive = 300.0             # seconds a sync waits for the other replicas before this one fails
    snapshot_dir: str = ""                # a folder every replica shares: replica r snapshots to replica-<r>/ in it
                                          # (needed to rescale; "": each its own state_dir/snapshots)

    @property
    def enabled(self) -> bool:
        """This service is a replica of a cluster (even alone, when it keeps a cluster's snapshots to rescale)."""
        return self.replicas > 1 or bool(self.snapshot_dir)


class Config(_Section):
    source: str = "kafka"           # "kafka" or "file:PATH.jsonl"
    seed: int = 42
    state_dir: str = "state"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    torch_threads: Annotated[int, msgspec.Meta(ge=0)] = 1   # intra-op threads of torch learners (0: torch's default)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    join: JoinConfig = msgspec.field(default_factory=JoinConfig)
    intake: IntakeConfig = msgspec.field(default_factory=IntakeConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    snapshot: SnapshotConfig = msgspec.field(default_factory=SnapshotConfig)
    drift: DriftConfig = msgspec.field(default_factory=DriftConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    publish: PublishConfig = msgspec.field(default_factory=PublishConfig)
    gate: GateConfig = msgspec.field(default_factory=GateConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    models: dict[str, ModelConfig] = msgspec.field(default_factory=lambda: {"default": ModelConfig()})

    @property
    def file_path(self) -> Optional[Path]:
        return Path(self.source[5:]) if self.source.startswith("file:") else None


def load_config(path: Optional[str | Path], env: Optional[Mapping[str, str]] = None) -> Config:
    """Reads the TOML file (if any), applies environment overrides and validates."""
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config error: --config: file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config error: {path}: not valid TOML: {err}") from None
    return parse_config(data, os.environ if env is None else env)


def parse_config(data: dict, env: Mapping[str, str]) -> Config:
    data = _with_env_overrides(data, env)
    models = data.pop("models", None)
    config = _convert(data, Config, "")
    if models is not None:
        if not isinstance(models, dict):
            raise ConfigError("config error: models: must be a table of model names")
        config.models = {name: _convert(table, ModelConfig, f"models.{name}.") for name, table in models.items()}
    _check(config)
    if config.source == "kafka":
        resolve_settings(config.kafka.settings, env)  # a missing secret fails now, not in the intake process
    return config


def _convert(data: object, kind: type, prefix: str):
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as err:
        raise ConfigError(f"config error: {prefix}{_phrase(str(err))}") from None


def resolve_settings(settings: Mapping[str, Setting], env: Mapping[str, str]) -> dict[str, Setting]:
    """Replaces "env:NAME" values by the environment variable's value."""
    resolved = {}
    for key, value in settings.items():
        if isinstance(value, str) and value.startswith("env:"):
            name = value[4:]
            if name not in env:
                raise ConfigError(f"config error: kafka.settings.{key}: environment variable {name} is not set")
            value = env[name]
        resolved[key] = value
    return resolved


def _check(config: Config) -> None:
    if config.source != "kafka" and config.file_path is None:
        raise ConfigError("config error: source: must be \"kafka\" or \"file:PATH\"")
    if not config.models:
        raise ConfigError("config error: models: at least one model must be configured")
    if config.eval.probe_size > config.eval.segment_size // 2:
        raise ConfigError("config error: eval.probe_size: at most half of eval.segment_size "
                          f"({config.eval.segment_size // 2}); the rest is learned")
    if config.join.early_ttl > config.join.ttl * 10:
        raise ConfigError("config error: join.early_ttl: should not exceed 10 x join.ttl")
    if config.gate.holdout_every == 1:
        raise ConfigError("config error: gate.holdout_every: 1 would hold out every example; 0 (none) or >= 2")
    if config.publish.enabled:
        _check_publish(config.publish)
    _check_cluster(config)
    if config.intake.processes > 1 and (config.intake.mode != "process" or config.file_path is not None):
        raise ConfigError("config error: intake.processes: more than 1 needs source = \"kafka\" and "
                          "intake.mode = \"process\" (a file is one partition)")
    for name, model in config.models.items():
        if model.train.loss == "er_ace" and model.task != "classification":
            raise ConfigError(f"config error: models.{name}.train.loss: \"er_ace\" needs task = \"classification\"")
        _check_distill(name, model)
        if model.is_lm:
            _check_lm(name, model.lm, config)


def _check_lm(name: str, lm: LmConfig, config: Config) -> None:
    key = f"config error: models.{name}.lm"
    if lm.max_tokens > lm.token_budget:
        raise ConfigError(f"{key}.max_tokens: {lm.max_tokens} is more than lm.token_budget ({lm.token_budget}): "
                          "a conversation could never be learned")
    if not lm.base:
        raise ConfigError(f"{key}.base: a language model needs its base model (a path, package:resource or "
                          "module:factory)")
    if config.cluster.enabled:
        raise ConfigError(f"{key}: language models do not run in a cluster yet (cluster.replicas = 1, no "
                          "cluster.snapshot_dir)")
    if config.publish.enabled and not lm.capabilities:
        raise ConfigError(f"{key}.capabilities: publishing a language model needs capability sets for its gate "
                          "(nothing else shows that a candidate is safe)")
    names = [c.name for c in lm.capabilities]
    for index, capability in enumerate(lm.capabilities):
        if names.index(capability.name) != index:
            raise ConfigError(f"{key}.capabilities[{index}].name: {capability.name!r} is used twice")
        if not Path(capability.path).is_file():
            raise ConfigError(f"{key}.capabilities[{index}].path: {capability.path} is not a file")


def replica_rank(config: Config, env: Optional[Mapping[str, str]] = None) -> int:
    """This replica's rank: `cluster.rank`, else the RANK environment variable (what torchrun sets); 0 alone."""
    cluster = config.cluster
    if cluster.replicas == 1:
        return 0
    if cluster.rank is not None:
        return cluster.rank
    value = (os.environ if env is None else env).get("RANK")
    if value is None or not value.isdigit() or int(value) >= cluster.replicas:
        raise ConfigError(f"config error: cluster.rank: not set, and RANK={value!r} is not a rank below "
                          f"cluster.replicas ({cluster.replicas})")
    return int(value)


def _check_cluster(config: Config) -> None:
    """Replicas read shares of Kafka partitions (divided by partition number when they rescale)."""
    cluster = config.cluster
    if not cluster.enabled:
        return
    if config.file_path is not None:
        key = "cluster.replicas: more than 1" if cluster.replicas > 1 else "cluster.snapshot_dir: a cluster"
        raise ConfigError(f"config error: {key} needs source = \"kafka\" (a file is one partition)")
    if cluster.rank is not None and cluster.rank >= cluster.replicas:
        raise ConfigError(f"config error: cluster.rank: {cluster.rank} is not below cluster.replicas "
                          f"({cluster.replicas})")
    if config.drift.policy.enabled:
        raise ConfigError("config error: drift.policy.enabled: set it false in a cluster (cluster.replicas > 1 or "
                          "cluster.snapshot_dir): a replica that resets or restores its model on its own cannot be "
                          "averaged with the others yet")


def _check_distill(name: str, model: ModelConfig) -> None:
    """`train.distill` needs outputs per class to keep and a replay buffer to keep them in."""
    if not model.train.distill:
        return
    if model.task != "classification":
        raise ConfigError(f"config error: models.{name}.train.distill: needs task = \"classification\"")
    if model.replay.kind == "none" or model.replay.ratio == 0:
        raise ConfigError(f"config error: models.{name}.train.distill: needs replay (replay.kind and replay.ratio > 0)")


def check_source(config: Config) -> None:
    """Before a run: a `file:PATH` source must name a readable file (other commands may name a file gone since)."""
    path = config.file_path
    if path is not None and not path.is_file():
        raise ConfigError(f"config error: source: {path} {'is not a file' if path.exists() else 'does not exist'}")


def _check_publish(publish: PublishConfig) -> None:
    """Registry and artifact locations this build can open (fsspec for URLs other than file://)."""
    if "://" in publish.registry:
        raise ConfigError("config error: publish.registry: a SQLite file path (the built-in registry), "
                          f"not {publish.registry.split('://')[0]}://")
    scheme = publish.artifacts.split("://")[0] if "://" in publish.artifacts else "file"
    if scheme != "file":
        try:
            import fsspec

            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"config error: publish.artifacts: cannot open {scheme}:// URLs: {err}") from None
    if not publish.topic:
        raise ConfigError("config error: publish.topic: must not be empty")


def _with_env_overrides(data: dict, env: Mapping[str, str]) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for name, value in env.items():
        if not name.startswith("STREAMLEARN_") or name in NON_SETTING_ENV:
            continue
        path = _setting_path(name[len("STREAMLEARN_"):].lower())
        if path is None:
            raise ConfigError(f"config error: {name}: no such setting")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: {name}: {part} is not a section")
        node[path[-1]] = value
    return data


def _setting_path(name: str) -> Optional[list[str]]:
    fields = {f.name: f.type for f in msgspec.structs.fields(Config)}
    if name in fields:
        return [name]
    section, _, key = name.partition("_")
    if section == "models" and key:
        for field in msgspec.structs.fields(ModelConfig):
            if key.endswith("_" + field.name):
                return ["models", key[: -len(field.name) - 1], field.name]
        return None
    return _path_in(fields.get(section), section, key)


def _path_in(section_type, section: str, key: str) -> Optional[list[str]]:
    """The path of `key` in a section, or in a section within it (`drift_policy_enabled`: drift.policy.enabled)."""
    if not (isinstance(section_type, type) and issubclass(section_type, _Section)):
        return None
    fields = {f.name: f.type for f in msgspec.structs.fields(section_type)}
    if key in fields:
        return [section, key]
    inner, _, rest = key.partition("_")
    found = _path_in(fields.get(inner), inner, rest) if rest else None
    return [section, *found] if found else None


def _phrase(message: str) -> str:
    """msgspec's "Expected `int` - at `$.join.ttl`" -> "join.ttl: Expected `int`"."""
    match = re.match(r"(.*?)(?: - at `\$\.?(.*)`)?$", message)
    problem, key = match.group(1), match.group(2) or ""
    field = re.match(r"Object contains unknown field `(.*)`", problem)
    if field:
        return f"{key + '.' if key else ''}{field.group(1)}: unknown setting"
    return f"{key}: {problem}" if key else problem
