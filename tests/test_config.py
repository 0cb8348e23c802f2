"""Config parsing: defaults, the TOML file, env overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamlearn.config import ConfigError, load_config, parse_config, resolve_settings
from streamlearn.service import Service


def error_of(data: dict, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env=env or {})
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_need_no_file():
    config = parse_config({}, env={})
    assert config.source == "kafka"
    assert list(config.models) == ["default"]
    assert config.metrics.port == 9108


def test_file_and_env_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[join]\nttl = 100\n[models.fraud]\nmodel = "hoeffding_tree"\n')
    env = {"STREAMLEARN_JOIN_TTL": "250", "STREAMLEARN_METRICS_PORT": "0", "STREAMLEARN_SEED": "9",
           "STREAMLEARN_MODELS_FRAUD_WINDOW": "50", "STREAMLEARN_KAFKA_GROUP_ID": "g2",
           "STREAMLEARN_SNAPSHOT_KEY": "not a setting", "OTHER": "ignored"}
    config = load_config(path, env=env)
    assert (config.seed, config.join.ttl, config.metrics.port, config.kafka.group_id) == (9, 250.0, 0, "g2")
    assert (config.models["fraud"].model, config.models["fraud"].window) == ("hoeffding_tree", 50)
    published = load_config(path, env={"STREAMLEARN_PUBLISH_ENABLED": "true",
                                       "STREAMLEARN_GATE_REGRESSION_TOLERANCE": "0.05"})
    assert (published.publish.enabled, published.gate.regression_tolerance) == (True, 0.05)


@pytest.mark.parametrize("data, env, key", [
    ({"join": {"ttl": -1}}, {}, "join.ttl"),
    ({"join": {"ttl": "soon"}}, {}, "join.ttl"),
    ({"join": {"tll": 5}}, {}, "join.tll: unknown setting"),
    ({"metrics": {"port": 70000}}, {}, "metrics.port"),
    ({"kafka": {"client": "librdkafka-go"}}, {}, "kafka.client"),
    ({"models": {"m": {"task": "ranking"}}}, {}, "models.m.task"),
    ({"models": {"m": {"window": 0}}}, {}, "models.m.window"),
    ({"source": "s3://bucket"}, {}, "source"),
    ({}, {"STREAMLEARN_JOIN_MAX_PENDING": "many"}, "join.max_pending"),
    ({}, {"STREAMLEARN_JOIN_NOPE": "1"}, "STREAMLEARN_JOIN_NOPE: no such setting"),
    ({"gate": {"regression_tolerance": -0.1}}, {}, "gate.regression_tolerance"),
    ({"gate": {"holdout_every": 1}}, {}, "gate.holdout_every: 1 would hold out every example"),
    ({"gate": {"min_shadow_score": "high"}}, {}, "gate.min_shadow_score"),
    ({"publish": {"enabled": True, "artifacts": "nope://bucket"}}, {}, "publish.artifacts: cannot open nope://"),
    ({"publish": {"enabled": True, "registry": "postgresql://db/registry"}}, {}, "publish.registry"),
    ({}, {"STREAMLEARN_PUBLISH_EVERY_EXAMPLES": "-5"}, "publish.every_examples"),
])
def test_bad_settings_name_their_key(data, env, key):
    assert error_of(data, env).startswith(f"config error: {key}")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[join\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, env={})


@pytest.mark.parametrize("model, key", [
    ({"model": "no_such_model"}, "models.m.model"),
    ({"model": "os:getcwd"}, "models.m.model"),  # callable, but not an estimator
    ({"model": "no.such.module:factory"}, "models.m.model"),
    ({"model": "logreg", "params": {"bogus": 1}}, "models.m.params"),
    ({"model": "hoeffding_tree", "learn_mode": "many"}, "models.m.learn_mode"),
    ({"model": "hoeffding_tree", "task": "regression"}, "models.m.model"),
])
def test_models_that_cannot_be_built_fail_at_start(model, key):
    config = parse_config({"models": {"m": model}, "metrics": {"enabled": False}, "snapshot": {"enabled": False}},
                          env={})
    with pytest.raises(ConfigError, match=f"^config error: {key}: "):
        Service(config)


def test_the_example_config_is_valid():
    example = Path(__file__).resolve().parent.parent / "ops" / "config.example.toml"
    config = load_config(example, env={"KAFKA_PASSWORD": "x"})
    assert config.models["fraud"].model == "logreg"
    assert error_of({"kafka": {"settings": {"sasl.password": "env:KAFKA_PASSWORD"}}}).startswith(
        "config error: kafka.settings.sasl.password: environment variable KAFKA_PASSWORD is not set")


def test_secrets_come_from_the_environment():
    settings = {"sasl.username": "svc", "sasl.password": "env:KAFKA_PASSWORD"}
    assert resolve_settings(settings, {"KAFKA_PASSWORD": "s3cret"})["sasl.password"] == "s3cret"
    with pytest.raises(ConfigError, match="kafka.settings.sasl.password: environment variable KAFKA_PASSWORD"):
        resolve_settings(settings, {})


def test_a_metrics_port_in_use_is_a_config_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(parse_config({"metrics": {"host": "127.0.0.1", "port": port},
                                        "snapshot": {"enabled": False}}, env={}))
        with pytest.raises(ConfigError, match=f"^config error: metrics.port: cannot listen on 127.0.0.1:{port}"):
            service.start_metrics()


def test_a_missing_source_file_is_a_one_line_config_error(tmp_path):
    import subprocess
    import sys

    from streamlearn.config import check_source

    config = parse_config({"source": f"file:{tmp_path / 'gone.jsonl'}", "state_dir": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match=r"^config error: source: .*gone\.jsonl does not exist$"):
        check_source(config)
    with pytest.raises(ConfigError, match="is not a file"):
        check_source(parse_config({"source": f"file:{tmp_path}"}, env={}))
    toml = tmp_path / "config.toml"
    toml.write_text(f'source = "file:{tmp_path / "gone.jsonl"}"\nstate_dir = "{tmp_path / "state"}"\n'
                    '[metrics]\nenabled = false\n[models.m]\nmodel = "logreg"\n')
    result = subprocess.run([sys.executable, "-m", "streamlearn", "run", "--config", str(toml)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"config error: source: {tmp_path / 'gone.jsonl'} does not exist"]
