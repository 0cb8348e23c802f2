"""The generic learner checks (`streamlearn/learners/checks.py`) on every built-in model and mode, and on
`package.module:factory` models (River and torch, defined below), and on a language model (a tiny random Llama)."""

from __future__ import annotations

import pytest
import torch
from river import linear_model, preprocessing

from streamlearn.config import LmConfig, ModelConfig, ReplayConfig, TrainConfig
from streamlearn.learners.checks import make_stream, yield_checks
from streamlearn.learners.lm.learner import LmLearner
from streamlearn.learners.models import ModelError
from streamlearn.learners.river_learner import RiverLearner
from streamlearn.learners.torch_learner import TorchLearner

SEED = 7
MICRO = TrainConfig(batch_size=8, max_wait=2.0)   # small micro-batches: several full and partial ones per stream
RIVER_FACTORY, TORCH_FACTORY = "tests.test_learner_checks:river_factory", "tests.test_learner_checks:torch_factory"
RIVER = {"classification": ("logreg", "scaled_logreg", "softmax", "hoeffding_tree", "hoeffding_adaptive_tree", "arf",
                            "naive_bayes", RIVER_FACTORY),
         "regression": ("linreg", "hoeffding_tree_regressor", "arf_regressor")}
MANY = {"logreg", "scaled_logreg", "naive_bayes", "linreg", RIVER_FACTORY}   # the models with learn_many


def river_factory():
    """A `package.module:factory` River model: a scaled perceptron."""
    return preprocessing.StandardScaler() | linear_model.Perceptron()


def torch_factory(in_features: int, out_features: int, width: int = 8) -> torch.nn.Module:
    """A `package.module:factory` torch network."""
    return torch.nn.Sequential(torch.nn.Linear(in_features, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, out_features))


def river(model: str, task: str, mode: str):
    config = ModelConfig(model=model, task=task, learn_mode=mode, window=50, train=MICRO)
    return lambda: RiverLearner("m", config, SEED)


def torch_learner(task: str, model: str = "mlp", **params):
    config = ModelConfig(model=model, kind="torch", task=task, window=50, params=params, train=MICRO,
                         replay=ReplayConfig(capacity=40))
    return lambda: TorchLearner("m", config, seed=SEED)


SUBJECTS = {
    **{f"{model}-{mode}": river(model, task, mode) for task, models in RIVER.items() for model in models
       for mode in ("one", "many") if mode == "one" or model in MANY},
    **{f"mlp-{task}{'-dropout' if dropout else ''}": torch_learner(task, hidden=[8], dropout=dropout)
       for task in ("classification", "regression") for dropout in (0.0, 0.2)},
    TORCH_FACTORY: torch_learner("classification", TORCH_FACTORY),
    "mlp-classification-distill": lambda: TorchLearner("m", ModelConfig(   # logit replay: logits in the buffer
        model="mlp", kind="torch", params={"hidden": [8]}, window=50, replay=ReplayConfig(capacity=40),
        train=TrainConfig(batch_size=8, max_wait=2.0, distill=0.3)), seed=SEED),
}
SUBJECTS["lm"] = lambda: LmLearner("m", ModelConfig(kind="lm", window=50, lm=LmConfig(
    base="streamlearn.learners.lm.tiny:tiny_llama", batch_size=8, micro_batch=3, max_wait=2.0, max_tokens=64,
    replay_size=20, ewc_lambda=100.0, consolidate_every=16)), seed=SEED)
STREAMS = {task: make_stream(task) for task in ("classification", "regression", "generation")}
# (subject, check) -> a defect the checks found and this test leaves, with its reason (strict: fixing it fails here)
HINGE_MANY = ("River 0.26: learn_many with per-sample weights raises on a hinge loss (Perceptron: int gradient "
              "*= float weights), so every weighted micro-batch is refused; learn_one takes the weights")
XFAIL: dict[tuple[str, str], str] = {
    (f"{RIVER_FACTORY}-many", "check_weights_honoured_or_announced"): HINGE_MANY,
}


@pytest.mark.parametrize("check", list(yield_checks()), ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_learner_passes_every_check(subject, check, request):
    reason = XFAIL.get((subject, check.__name__))
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    factory = SUBJECTS[subject]
    check(factory, STREAMS[factory().task])


@pytest.mark.parametrize("model, task", [(m, t) for t, models in RIVER.items() for m in models if m not in MANY])
def test_many_is_refused_when_built_for_a_model_without_learn_many(model, task):
    """So MANY above lists exactly the River models the suite runs in "many" mode."""
    with pytest.raises(ModelError, match="no learn_many") as refused:
        river(model, task, "many")()
    assert refused.value.key == "learn_mode"
