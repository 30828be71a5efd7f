"""Registry-gated promotion on a real MLflow store (SQLite): the alias moves only for a better AP on
the same validation set with a passed export check, and the registry says why either way."""

import pytest

from centernet_ray.promotion import AP_METRIC, REASON_TAG, VAL_FINGERPRINT_TAG, promote


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (creating an MLflow database takes seconds); each test its own model."""
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("promotion")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("promotion", artifact_location=str(tmp_path / "artifacts"))

    def run(ap, fingerprint="val-a"):
        run_id = client.create_run(experiment, tags={VAL_FINGERPRINT_TAG: fingerprint}).info.run_id
        client.log_metric(run_id, AP_METRIC, ap)
        return run_id

    return uri, client, run


def _aliases(client, name):
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_first_better_worse_and_failed_export(store):
    uri, client, run = store
    first = promote(uri, "det", run(0.40), 0.40, export_passed=True)
    assert first.promoted and first.version == "1" and first.reason == "first champion (AP 0.4000)"
    assert _aliases(client, "det") == {"candidate": "1", "champion": "1"}

    better = promote(uri, "det", run(0.45), 0.45, export_passed=True)
    assert better.promoted and better.champion_version == "1"
    assert better.reason == "AP 0.4500 beats the champion's (version 1) 0.4000"
    assert _aliases(client, "det") == {"candidate": "2", "champion": "2"}

    worse = promote(uri, "det", run(0.45), 0.45, export_passed=True)  # equal is not better
    assert not worse.promoted and "does not beat the champion's (version 2) 0.4500" in worse.reason
    assert _aliases(client, "det") == {"candidate": "3", "champion": "2"}
    assert client.get_model_version("det", "3").tags[REASON_TAG] == worse.reason

    failed = promote(uri, "det", run(0.90), 0.90, export_passed=False, export_reason="3 detections have no twin")
    assert not failed.promoted and failed.reason == "the export check failed: 3 detections have no twin"
    assert _aliases(client, "det") == {"candidate": "4", "champion": "2"}


def test_another_validation_set_is_not_compared(store):
    uri, client, run = store
    promote(uri, "other-val", run(0.40), 0.40, export_passed=True)
    other = promote(uri, "other-val", run(0.99, fingerprint="val-b"), 0.99, export_passed=True)
    assert not other.promoted and "another validation set (val-a vs val-b)" in other.reason
    assert _aliases(client, "other-val")["champion"] == "1"


def test_a_version_the_run_registered_itself_is_reused_and_custom_aliases(store):
    uri, client, run = store
    run_id = run(0.3)
    client.create_registered_model("logged")
    client.create_model_version("logged", f"runs:/{run_id}/model", run_id=run_id)  # as log_model registers
    result = promote(uri, "logged", run_id, 0.3, export_passed=True, candidate_alias="staging", champion_alias="prod")
    assert result.version == "1" and _aliases(client, "logged") == {"staging": "1", "prod": "1"}


def test_an_export_that_cannot_run_is_a_reason_not_to_promote_not_a_failed_run(store):
    from centernet_ray.config import load_config
    from centernet_ray.promotion import export_and_promote

    uri, client, run = store
    config = load_config(None, [f"tracking.tracking_uri={uri}", "tracking.registered_model=no-checkpoint"])
    run_id = run(0.5)  # a run that logged no checkpoint
    result = export_and_promote(config, run_id, 0.5)
    assert not result.promoted and result.reason.startswith("the export check failed: UserInputError: ")
    assert f"no checkpoint/checkpoint.pt in run {run_id}" in result.reason
    assert _aliases(client, "no-checkpoint") == {"candidate": "1"}


def test_two_runs_promoting_at_once_leave_the_better_one_champion(store, monkeypatch):
    """A (AP 0.50) and B (0.45) finish together: both decide against the champion of 0.40, A moves
    the alias first. B decides again against the champion as it is now (A) and leaves it; without
    that, the last to move the alias (B, the worse) won."""
    import threading

    from centernet_ray import promotion

    uri, client, run = store
    promote(uri, "race", run(0.40), 0.40, export_passed=True)
    a, b = run(0.50), run(0.45)
    for run_id in (a, b):  # registered first: the race is the alias, not the registration
        promotion.register_version(client, "race", run_id)
    both_decided, a_moved, first_decisions = threading.Barrier(2, timeout=60), threading.Event(), set()
    decide = promotion._decide

    def racing(client_, champion, version, run_id, *args):
        outcome = decide(client_, champion, version, run_id, *args)
        if run_id not in first_decisions:
            first_decisions.add(run_id)
            both_decided.wait()  # both against version 1
            if run_id == b:
                a_moved.wait(60)
        return outcome

    monkeypatch.setattr(promotion, "_decide", racing)
    results = {}

    def promote_as(run_id, ap):
        results[run_id] = promote(uri, "race", run_id, ap, export_passed=True)
        if run_id == a:
            a_moved.set()

    threads = [threading.Thread(target=promote_as, args=args) for args in ((a, 0.50), (b, 0.45))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results[a].promoted and not results[b].promoted
    assert "does not beat the champion's (version 2) 0.5000" in results[b].reason
    assert _aliases(client, "race")["champion"] == results[a].version == "2"
