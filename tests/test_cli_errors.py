"""The `lancetag` command's one error boundary, run as users run it (the console script, in subprocesses).

Every expected failure ends as exactly one line ``error: <reason>: <message>`` on stderr and exit 2;
with ``--json`` stdout holds exactly ``{"error": {"reason": ..., "message": ...}}``; no traceback
unless ``--debug``/``LANCETAG_DEBUG=1``; a bug is ``error: internal: ...`` with exit 3 (docs/cli.md).
Commands that fail before Ray run with ``RAY_ADDRESS`` pointing at a closed port: had one of them
started or joined Ray, it would fail differently (or hang) instead of giving its reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from tests.conftest import LANCETAG, REPO_ROOT
from tests.table_fixtures import image_rows

UNREACHABLE_LABELER = "http://127.0.0.1:9"  # nothing listens on the discard port
BAD_SQL = "nonsense ==="
DROP_READ_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search", "--"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


NO_RAY = {"RAY_ADDRESS": f"127.0.0.1:{_closed_port()}"}


def lancetag(args: Sequence[str], *, env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run the console command; return the finished process (text output)."""
    return subprocess.run(
        [*prefix, LANCETAG, *args], capture_output=True, text=True, timeout=180, env={**os.environ, **NO_RAY, **(env or {})}
    )


def refusal_problems(proc: subprocess.CompletedProcess, reason: str, *, as_json: bool) -> list[str]:
    """Return how ``proc`` breaks the error contract for ``reason`` (empty when it keeps it)."""
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit {proc.returncode}, not 2")
    if "Traceback" in proc.stdout + proc.stderr:
        problems.append("a traceback")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1 or not errors[0].startswith(f"error: {reason}: "):
        return [*problems, f"error lines {errors}"]
    message = errors[0][len(f"error: {reason}: ") :]
    if not message.strip():
        problems.append("an empty message")
    if as_json:
        try:
            printed = json.loads(proc.stdout)  # the whole stdout: one object, nothing else
        except json.JSONDecodeError:
            printed = proc.stdout
        if printed != {"error": {"reason": reason, "message": message}}:
            problems.append(f"stdout {proc.stdout!r}")
    elif proc.stdout:
        problems.append(f"stdout {proc.stdout!r} without --json")
    return problems


def assert_refused(
    cases: dict[str, tuple[Sequence[str], str]],
    *,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    as_json: bool = True,
) -> None:
    """Run every case (name -> (args, reason)) two at a time; fail listing each broken contract."""
    flag = ["--json"] if as_json else []
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(lambda c: lancetag([*c[0], *flag], env=env, prefix=prefix), cases.values()), strict=True))
    failures = [
        f"{name}: {'; '.join(problems)}\n  stderr: {procs[name].stderr[-600:]!r}"
        for name, (_, reason) in cases.items()
        if (problems := refusal_problems(procs[name], reason, as_json=as_json))
    ]
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    """A real 6-row image table at versions 1 (create) and 2 (append), with a `truth` column."""
    from lance_io import append_images

    uri = str(tmp_path_factory.mktemp("cli-errors") / "t.lance")
    append_images(uri, image_rows(range(3)))
    append_images(uri, image_rows(range(3, 6)))
    return uri


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """A folder of broken inputs: an invalid task, invalid YAML, a training config with an unknown key."""
    folder = tmp_path_factory.mktemp("cli-error-configs")
    (folder / "bad_task.yaml").write_text("kind: classify\nlabels: [only-one]\n")
    (folder / "not_yaml.yaml").write_text("model_name_or_path: [unclosed\n")
    (folder / "unknown_key.yaml").write_text("model_name_or_path: m\nstage: sft\nlancetag:\n  no_such_key: 1\n")
    return folder


def test_missing_tables_versions_and_columns_are_one_error_line_and_one_json_object(table, tmp_path):
    missing = str(tmp_path / "none.lance")
    datasets = str(tmp_path / "datasets")
    assert_refused(
        {
            "show": (["show", missing], "table_not_found"),
            "versions": (["versions", missing], "table_not_found"),
            "query": (["query", missing], "table_not_found"),
            "diff": (["diff", missing, "1", "2"], "table_not_found"),
            "tag": (["tag", missing, "x"], "table_not_found"),
            "restore": (["restore", missing, "1"], "table_not_found"),
            "eval": (["eval", missing], "table_not_found"),
            "label": (["label", missing, "--task", "digits", "--serve", UNREACHABLE_LABELER], "table_not_found"),
            "lf register": (["lf", "register", missing, "--name", "x", "--dataset-dir", datasets], "table_not_found"),
            "show -v": (["show", table, "--version", "99"], "version_not_found"),
            "query -v": (["query", table, "--version", "no-such-tag"], "version_not_found"),
            "diff v": (["diff", table, "1", "99"], "version_not_found"),
            "tag -v": (["tag", table, "x", "--version", "99"], "version_not_found"),
            "restore v": (["restore", table, "99"], "version_not_found"),
            "eval --version": (["eval", table, "--column", "truth", "--version", "99"], "version_not_found"),
            "lf register --version": (["lf", "register", table, "--name", "x", "--dataset-dir", datasets, "--version", "99"], "version_not_found"),
            "query --columns": (["query", table, "--columns", "id,nope"], "column_missing"),
            "diff --column": (["diff", table, "1", "2", "--column", "nope"], "column_missing"),
            "eval --column": (["eval", table, "--column", "nope"], "column_missing"),
            "lf register --label-column": (["lf", "register", table, "--name", "x", "--dataset-dir", datasets, "--label-column", "nope"], "column_missing"),
        }
    )
    assert not (tmp_path / "none.lance").exists(), "a failed read must not create the table"


def test_bad_sql_tasks_configs_and_usage_are_refused_with_their_reason(table, configs, tmp_path):
    datasets = str(tmp_path / "datasets")
    defined = tmp_path / "defined"  # a dataset_dir that defines `digits` (as a JSON file LLaMA-Factory would read)
    defined.mkdir()
    (defined / "dataset_info.json").write_text(json.dumps({"digits": {"file_name": "digits.json"}}))
    label = ["label", table, "--serve", UNREACHABLE_LABELER]
    foreign, photos = str(tmp_path / "foreign.lance"), tmp_path / "photos"  # someone else's Lance table
    lance.write_dataset(pa.table({"a": [1, 2]}), foreign)
    photos.mkdir()
    (photos / "a.png").write_bytes(image_rows(range(1))["image"][0].as_py())
    assert_refused(
        {
            "ingest into a table of something else": (["ingest", str(photos), "--table", foreign], "not_an_image_table"),
            "query --where": (["query", table, "--where", BAD_SQL], "bad_where"),
            "query --where unknown column": (["query", table, "--where", "nope = 1"], "bad_where"),
            "lf register --where two statements": (["lf", "register", table, "--name", "x", "--dataset-dir", datasets, "--where", "width > 1 ; x"], "bad_where"),
            "query --limit": (["query", table, "--limit", "-1"], "bad_usage"),
            "label --version-tag": ([*label, "--task", "digits", "--version-tag", "no spaces"], "bad_tag"),
            "eval --price-per-hour": (["eval", table, "--column", "truth", "--price-per-hour", "-1"], "bad_usage"),
            "demo --epochs": (["demo", "--workdir", str(tmp_path / "demo"), "--epochs", "0"], "bad_option"),
            "label --where": ([*label, "--task", "digits", "--where", BAD_SQL], "bad_where"),
            "label --column truth": ([*label, "--task", "digits", "--column", "truth"], "column_taken"),
            "label --column id": ([*label, "--task", "digits", "--column", "id"], "column_taken"),
            "eval --where": (["eval", table, "--column", "truth", "--where", BAD_SQL], "bad_where"),
            "lf register --where": (["lf", "register", table, "--name", "x", "--dataset-dir", datasets, "--where", BAD_SQL], "bad_where"),
            "label unreachable": ([*label, "--task", "digits"], "labeler_unreachable"),
            "label bad task": ([*label, "--task", str(configs / "bad_task.yaml")], "bad_task"),
            "label no task": ([*label, "--task", "no_such_task"], "bad_task"),
            "serve bad task": (["serve", "--task", str(configs / "bad_task.yaml"), "--model", "m", "--no-blocking"], "bad_task"),
            "serve no task": (["serve", "--task", "no_such_task", "--model", "m", "--no-blocking"], "bad_task"),
            # NO_RAY's RAY_ADDRESS is a cluster that is down: ray.init would retry it for ever
            "serve on a cluster that is down": (["serve", "--task", "digits", "--model", "m", "--no-blocking"], "ray_unreachable"),
            "ingest on a cluster that is down": (["ingest", str(photos), "--table", str(tmp_path / "down.lance")], "ray_unreachable"),
            "train --workers on a cluster that is down": (
                ["train", str(REPO_ROOT / "configs/train/tiny_qwen2_vl_cpu.yaml"), "--workers", "1"], "ray_unreachable"
            ),
            "lf register bad task": (["lf", "register", table, "--name", "x", "--dataset-dir", datasets, "--task", str(configs / "bad_task.yaml")], "bad_task"),
            "train no config": (["train", str(configs / "none.yaml")], "config_not_found"),
            "train not yaml": (["train", str(configs / "not_yaml.yaml")], "bad_yaml"),
            "train unknown key": (["train", str(configs / "unknown_key.yaml")], "bad_lancetag_block"),
            "train --set": (["train", str(configs / "unknown_key.yaml"), "--set", "max_steps"], "bad_override"),
            "train no model": (
                ["train", str(REPO_ROOT / "configs/train/tiny_qwen2_vl_cpu.yaml"), "--set", f"model_name_or_path={tmp_path / 'none'}",
                 "--set", f"dataset_dir={defined}", "--set", f"output_dir={tmp_path / 'out'}"],
                "model_not_found",
            ),
            **{
                f"train {what}": (
                    ["train", str(REPO_ROOT / "configs/train/tiny_qwen2_vl_cpu.yaml"), "--set", f"dataset_dir={defined}",
                     "--set", f"output_dir={tmp_path / 'out'}", "--set", "dataset=digits", *setting],
                    reason,
                )
                for what, setting, reason in [  # the others in test_lf_configs.py, in one process
                    ("unknown LLaMA-Factory key", ["--set", "no_such_argument=1"], "bad_training_config"),
                ]
            },
            "ingest --column": (["ingest", str(configs), "--table", str(tmp_path / "i.lance"), "--column", "path"], "bad_option"),
            "missing argument": (["show"], "bad_usage"),
            "unknown option": (["show", table, "--no-such-option"], "bad_usage"),
            "unknown command": (["no-such-command"], "bad_usage"),
        }
    )


def test_a_ray_address_ray_cannot_read_is_ray_unreachable_not_a_bug(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(image_rows(range(1))["image"][0].as_py())
    assert_refused({"ingest": (["ingest", str(photos), "--table", str(tmp_path / "t.lance")], "ray_unreachable")},
                   env={"RAY_ADDRESS": "nonsense"})  # before: error: internal: ValueError: Invalid address format


@pytest.mark.parametrize("ray_address", [None, NO_RAY["RAY_ADDRESS"]], ids=["dashboard", "ray-address-first"])
def test_submitting_to_a_cluster_that_does_not_answer_is_ray_unreachable_not_a_bug(ray_address):
    """Ray's job client asks the cluster at RAY_ADDRESS before --address: either one down is refused at once."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ({"RAY_ADDRESS": ray_address} if ray_address else {})
    address = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.run([LANCETAG, "submit", "--address", address, "--json", "--", "show", "x"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert refusal_problems(proc, "ray_unreachable", as_json=True) == []
    assert (ray_address or address) in proc.stderr


def test_without_json_stdout_stays_empty_and_stderr_holds_the_one_line(table, tmp_path):
    assert_refused(
        {
            "missing table": (["show", str(tmp_path / "none.lance")], "table_not_found"),
            "bad sql": (["query", table, "--where", BAD_SQL], "bad_where"),
            "labeler": (["label", table, "--task", "digits", "--serve", UNREACHABLE_LABELER], "labeler_unreachable"),
        },
        as_json=False,
    )


def test_an_unreachable_object_store_is_storage_unreachable(table):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = {"endpoint": endpoint, "allow_http": "true", "aws_access_key_id": "k", "aws_secret_access_key": "s",
               "region": "us-east-1", "client_max_retries": "0"}  # Lance retries 3 times by default
    uri = "s3://bucket/t.lance"
    assert_refused(
        {
            "show": (["show", uri], "storage_unreachable"),
            "versions": (["versions", uri], "storage_unreachable"),
            "query": (["query", uri, "--where", "truth = '1'"], "storage_unreachable"),
            "label": (["label", uri, "--task", "digits", "--serve", UNREACHABLE_LABELER], "storage_unreachable"),
            "eval": (["eval", uri], "storage_unreachable"),
        },
        env={"LANCETAG_STORAGE_OPTIONS": json.dumps(options)},
    )


@pytest.fixture
def locked_table(table, tmp_path) -> Iterator[Path]:
    """A copy of the table whose folder its reader may not open (chmod 000); restored afterwards."""
    locked = tmp_path / "locked.lance"
    shutil.copytree(table, locked)
    locked.chmod(0)
    yield locked
    locked.chmod(0o755)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_a_table_the_user_may_not_read_or_write_is_permission_denied(locked_table):
    # Tests run as root, which permission bits do not stop: drop the capabilities that let it pass.
    probe = subprocess.run([*DROP_READ_OVERRIDE, "ls", str(locked_table)], capture_output=True)
    assert probe.returncode != 0, "the dropped capabilities must make chmod 000 deny the reader"
    uri = str(locked_table)
    assert_refused(
        {
            "show": (["show", uri], "permission_denied"),
            "query": (["query", uri], "permission_denied"),
            "versions": (["versions", uri], "permission_denied"),
            "label": (["label", uri, "--task", "digits", "--serve", UNREACHABLE_LABELER], "permission_denied"),
        },
        prefix=DROP_READ_OVERRIDE,
    )
    locked_table.chmod(0o555)  # readable, not writable: the write fails, the boundary names why
    assert_refused({"tag": (["tag", uri, "x"], "permission_denied")}, prefix=DROP_READ_OVERRIDE)


def test_debug_shows_the_traceback_and_still_ends_with_the_error_line(tmp_path):
    missing = str(tmp_path / "none.lance")
    for args, env in ((["--debug", "show", missing], {}), (["show", missing, "--debug"], {}), (["show", missing], {"LANCETAG_DEBUG": "1"})):
        proc = lancetag([*args, "--json"], env=env)
        assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr, (args, proc.stderr)
        assert "TableReadError" in proc.stderr
        assert proc.stderr.splitlines()[-1].startswith("error: table_not_found: no Lance table at ")
        assert json.loads(proc.stdout)["error"]["reason"] == "table_not_found"


def test_an_unexpected_error_is_internal_with_exit_3_and_a_partial_run_keeps_its_exit_1(capfd):
    import typer

    from ray_jobs.cli.errors import EXIT_INTERNAL, EXIT_PARTIAL, run_app
    from ray_jobs.cli.output import emit_json

    app = typer.Typer()

    @app.callback()
    def options(debug: bool = typer.Option(False, "--debug")) -> None:
        """The global options lancetag has."""

    @app.command()
    def broken(as_json: bool = typer.Option(False, "--json")) -> None:
        """Fail the way a bug does."""
        {}["missing"]

    @app.command()
    def partial(as_json: bool = typer.Option(False, "--json")) -> None:
        """End the way `lancetag label` does when fragments failed: its summary, then exit 1."""
        print("a library writing to stdout")  # with --json this goes to stderr: stdout is the JSON's
        emit_json({"failed": 1})
        raise typer.Exit(EXIT_PARTIAL)

    assert run_app(app, ["broken", "--json"]) == EXIT_INTERNAL
    out, err = capfd.readouterr()
    line = "error: internal: KeyError: 'missing' (run with --debug for the traceback)"
    assert err.splitlines() == [line] and "Traceback" not in err
    assert json.loads(out) == {"error": {"reason": "internal", "message": line[len("error: internal: ") :]}}

    assert run_app(app, ["broken", "--debug"]) == EXIT_INTERNAL
    err = capfd.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == "error: internal: KeyError: 'missing'"

    assert run_app(app, ["partial", "--json"]) == EXIT_PARTIAL
    out, err = capfd.readouterr()
    assert (out, err) == ('{"failed": 1}\n', "a library writing to stdout\n")


@pytest.mark.slow
def test_ingest_into_an_unreachable_object_store_is_storage_unreachable(tmp_path):
    from tests.ingest_fixtures import build_class_folder

    folder = build_class_folder(tmp_path, {"cat": 2, "dog": 2})
    options = {"endpoint": f"http://127.0.0.1:{_closed_port()}", "allow_http": "true", "aws_access_key_id": "k",
               "aws_secret_access_key": "s", "region": "us-east-1"}
    proc = lancetag(
        ["ingest", str(folder), "--table", "s3://bucket/t.lance", "--num-cpus", "1", "--json"],
        env={"LANCETAG_STORAGE_OPTIONS": json.dumps(options), "RAY_ADDRESS": ""},  # ingest starts its own Ray
    )
    assert refusal_problems(proc, "storage_unreachable", as_json=True) == [], proc.stderr[-2000:]
    assert "cannot reach the object store" in json.loads(proc.stdout)["error"]["message"]
    assert "Started a local Ray instance" not in proc.stderr  # refused before the job starts Ray


def test_the_demo_refuses_data_it_cannot_learn_from_before_any_work(tmp_path):
    """In process (the CLI's line for a ReasonError is checked above with --epochs)."""
    from lance_io.reasons import ReasonError
    from ray_jobs.demo import run_demo

    one_class = tmp_path / "one-class"
    (one_class / "cats").mkdir(parents=True)
    (one_class / "__MACOSX" / "cats").mkdir(parents=True)  # a Mac-made zip's metadata: no class
    (one_class / ".thumbnails").mkdir()
    a_file = tmp_path / "photo.png"
    a_file.write_bytes(b"not a folder")
    (tmp_path / "two-classes" / "dogs").mkdir(parents=True)
    (tmp_path / "two-classes" / "cats").mkdir()
    refusals = [
        (one_class, None, "bad_source", "at least two class folders"),
        (a_file, None, "bad_source", "is not a folder"),
        # folder names are one label per image: not a caption, nor five attributes
        (tmp_path / "two-classes", "caption", "bad_task", "1 question(s) with no fixed answers"),
        (tmp_path / "two-classes", "fashion", "bad_task", "5 question(s)"),
        (None, "fashion", "bad_task", "5 question(s)"),  # digits too, before they are written
    ]
    for data, task, reason, says in refusals:
        with pytest.raises(ReasonError) as refused:
            run_demo(tmp_path / "work", data=data, task=task)
        assert refused.value.reason == reason and says in refused.value.message
    with pytest.raises(ReasonError) as refused:  # `lancetag demo --data .` run from the photos' own folder
        run_demo(tmp_path / "two-classes" / "lancetag-work" / "demo-1", data=tmp_path / "two-classes")
    assert refused.value.reason == "bad_option" and "is inside the data folder" in refused.value.message
    assert not (tmp_path / "two-classes" / "lancetag-work").exists()  # nothing written into the photos
    assert not (tmp_path / "work" / "data").exists()
    assert not (tmp_path / "work" / "images.lance").exists() and not (tmp_path / "work" / "models").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["undecodable", "one_class_of_images", "linked_class_not_in_task"])
def test_the_demo_refuses_a_folder_it_cannot_learn_from_after_ingest_and_keeps_every_error(tmp_path, case):
    """Ingested, then refused in one line before any model work: files that are not images; images
    of one class only (the other class's folder holds a note and copies of the first's); or a class
    folder that the ``--task`` given does not name. In the last case the class folders are symlinks
    into a dataset kept outside the folder given, and the demo follows them (before, every image was
    refused as ``outside_root``); class b's images sit one folder deeper and are still b's."""
    import lance

    from lance_io.errors import errors_uri
    from tests.ingest_fixtures import image_bytes

    data = tmp_path / "data"
    linked = case == "linked_class_not_in_task"
    classes = tmp_path / "kept" if linked else data  # where the class folders really are
    inner = classes / "b" / "scans" if linked else classes / "b"
    (classes / "a").mkdir(parents=True)
    inner.mkdir(parents=True)
    if classes != data:  # data/a -> kept/a, data/b -> kept/b
        data.mkdir()
        for name in ("a", "b"):
            (data / name).symlink_to(classes / name, target_is_directory=True)
    for i in range(12):
        picture = b"\xff\xd8\xff" + bytes(60) if case == "undecodable" else image_bytes(i)  # a cut JPEG
        (data / "a" / f"{i}.jpg").write_bytes(picture)
        other = {"undecodable": b"GIF89a", "one_class_of_images": picture}.get(case, image_bytes(100 + i))
        (inner / f"{i}.jpg").write_bytes(other)
    (data / "b" / "notes.txt").write_text("the photographer's notes")
    work = tmp_path / "work"
    (tmp_path / "task.yaml").write_text("kind: classify\nname: ac\nlabels: [a, c]\n")
    task = ["--task", str(tmp_path / "task.yaml")] if linked else []
    proc = lancetag(["demo", "--data", str(data), "--workdir", str(work), "--json", *task], env={"RAY_ADDRESS": ""})  # its own Ray

    reason = {"undecodable": "no_images", "one_class_of_images": "recipe_needs_two_classes"}.get(case, "bad_source")
    assert refusal_problems(proc, reason, as_json=True) == [], proc.stderr[-2000:]
    assert "fork-safe" not in proc.stderr  # Lance's at-fork warning, raised as Ray forks and execs its processes
    message = json.loads(proc.stdout)["error"]["message"]
    assert not (work / "models" / "fine-tuned").exists()  # refused before any training
    errors = errors_uri(str(work / "images.lance"))
    if case == "undecodable":  # every file accounted for: 24 errors with their reasons, the note skipped
        assert "25 files" in message and "1 skipped" in message and errors in message
        assert lance.dataset(errors).count_rows() == 24
    elif case == "one_class_of_images":  # b's copies are duplicates of a's: the training rows hold one class
        assert "of 'a'" in message and "'b'" not in message
        assert lance.dataset(str(work / "images.lance")).count_rows() == 12
    else:  # every image ingested, the deeper ones under their class folder's name, which the task lacks
        assert "12 in the folder 'b'" in message and "['a', 'c']" in message
        assert lance.dataset(str(work / "images.lance")).count_rows() == 24


@pytest.mark.slow
@pytest.mark.parametrize(("share", "reason"), [("test", "no_rows"), ("validation", "validation_no_rows")])
def test_the_demo_refuses_a_folder_too_small_to_measure_before_any_model_work(tmp_path, share, reason):
    """Two classes of a few images each, chosen by the splits' own hashes so that none falls in the
    held-out share, or none of the training images in validation's share: either would leave the loop
    nothing to measure. Refused after ingest and the recipe, before the zero-shot tagging loads a model."""
    import hashlib

    from lance_io.splits import split_of
    from ray_jobs.demo import TEST_FRACTION
    from tests.ingest_fixtures import image_bytes

    def shares(image: bytes) -> set[str]:
        row_id = hashlib.sha256(image).hexdigest()[:32]  # the table's id
        held_out = split_of(row_id, TEST_FRACTION, held_out="test") == "test"
        # a handful of training rows: the recipe's validation share is its largest, 10%
        return {"test"} if held_out else {"train", split_of(row_id, 0.1, held_out="validation", salt="validation")}

    pool = [image_bytes(seed) for seed in range(200)]
    if share == "test":  # six training images, some of them in validation's share
        kept = [image for image in pool if "test" not in shares(image)][:6]
    else:  # a held-out image per class and four training images, none in validation's share
        kept = [image for image in pool if shares(image) == {"test"}][:2]
        kept += [image for image in pool if shares(image) == {"train"}][:4]
    data = tmp_path / "data"
    for name, images in {"a": kept[0::2], "b": kept[1::2]}.items():  # two training images per class at least
        (data / name).mkdir(parents=True)
        for i, image in enumerate(images):
            (data / name / f"{i}.jpg").write_bytes(image)
    work = tmp_path / "work"
    proc = lancetag(["demo", "--data", str(data), "--workdir", str(work), "--json"], env={"RAY_ADDRESS": ""})  # its own Ray

    assert refusal_problems(proc, reason, as_json=True) == [], proc.stderr[-2000:]
    table = lance.dataset(str(work / "images.lance"))
    assert table.count_rows() == 6  # every image kept
    assert "zero-shot" not in table.tags.list() and not (work / "models" / "fine-tuned").exists()


def test_a_ray_client_address_is_refused_for_the_jobs_that_run_on_ray_data(table, tmp_path):
    """Through Ray Client (``ray://``) an ingest failed inside Ray Data and a labeling run on its
    streaming actor calls, each as ``error: internal`` (a labeler already started); now both, and the
    demo, are refused before anything starts or is written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(image_rows(range(1))["image"][0].as_py())
    new_table = tmp_path / "new.lance"
    cases = {
        "ingest": (["ingest", str(photos), "--table", str(new_table)], "ray_client_unsupported"),
        "label": (["label", table, "--task", "digits", "--backend", "random", "--model", "demo"], "ray_client_unsupported"),
        "demo": (["demo", "--workdir", str(tmp_path / "demo")], "ray_client_unsupported"),
    }
    assert_refused(cases, env={"RAY_ADDRESS": "ray://127.0.0.1:10001"})
    assert not new_table.exists() and not (tmp_path / "demo").exists()
    assert_refused({"label --address": ([*cases["label"][0], "--address", "ray://head:10001"], "ray_client_unsupported")})


@pytest.mark.parametrize("ray_address", ["", "local"])  # no address, or Ray's own word for a new cluster
def test_serve_on_a_port_another_program_holds_is_port_in_use_before_a_cluster_starts(ray_address):
    """Before, the new cluster's Serve proxy failed to bind and the command printed Ray's RayTaskError
    with the proxy's tracebacks (exit 3); now the port is bound first, as the proxy binds it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        serve = ["serve", "--task", "digits", "--backend", "random", "--model", "demo", "--port", str(port), "--no-blocking"]
        assert_refused({"serve": (serve, "port_in_use")}, env={"RAY_ADDRESS": ray_address})
        proc = lancetag([*serve, "--json"], env={"RAY_ADDRESS": ray_address})
    assert f"127.0.0.1:{port}" in json.loads(proc.stdout)["error"]["message"]
