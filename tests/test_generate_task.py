"""Generate tasks: text from a row's columns, the faithfulness check, and a real run on vLLM (CPU).

The run test starts vLLM's OpenAI-compatible server (``.venv-vllm``) on a tiny random Qwen2-VL
and writes product descriptions from a table's fashion attributes with ``lancetag label``'s
job: incremental, grouped commits, provenance that includes the inputs' provenance.
"""

from __future__ import annotations

import json
import subprocess

import lance
import pyarrow as pa
import pytest

from lance_io.labels import (
    inputs_key,
    inputs_key_sql,
    label_schema,
    messages_for_row,
)
from lance_io.reasons import ReasonError
from lance_io.tasks import GenerateTask, load_task, task_from_dict
from ray_jobs.evaluation.faithfulness import faithfulness, mentions, missing_values
from tests.conftest import LANCETAG
from tests.test_openai_backend_vllm import SERVED_NAME, vllm_openai_server  # noqa: F401 (fixture)

SHIRT = {"category": "shirt", "fabric": "linen", "collar": "shirt collar", "pattern": "striped", "sleeve_length": "short"}


# ----------------------------------------------------------------------------- the task


def test_fashion_description_task_is_in_the_articles_words():
    task = load_task("fashion_description")
    assert isinstance(task, GenerateTask)
    assert (task.max_tokens, task.temperature) == (400, 0.1)
    assert "expert" in task.system_prompt and "descriptions of shirts" in task.system_prompt
    prompt = task.render(SHIRT)
    assert "contain every given attribute" in prompt
    for line in ("- fabric: linen", "- collar: shirt collar", "- sleeve length: short"):
        assert line in prompt


def test_a_prompt_placeholder_that_is_not_an_input_is_refused_naming_it():
    with pytest.raises(ReasonError) as refused:
        task_from_dict({"kind": "generate", "name": "g", "inputs": {"fabric": "attrs_fabric"}, "prompt": "{fit}"})
    assert refused.value.reason == "bad_task" and "{fit}" in refused.value.message
    with pytest.raises(ReasonError, match="check: 'fit' is not one of the inputs"):
        task_from_dict({"kind": "generate", "name": "g", "inputs": {"fabric": "attrs_fabric"}, "check": ["fit"]})


def test_a_generation_reply_that_is_not_a_chat_completion_fails_that_row_only():
    """A server answering 200 with something else (an error object, a list) fails that row with the
    reason; the other rows get their text (a test double of the endpoint: tests/test_openai_backend.py)."""
    from ray_jobs.label.generate import ChatEndpoint, generate_records
    from tests.test_openai_backend import FakeChatServer, reply

    task = load_task("fashion_description")
    rows = [{f"attrs_{k}": v for k, v in {**SHIRT, "fabric": fabric}.items()} for fabric in ("linen", "silk", "wool")]

    def answer(request):
        prompt = request["messages"][-1]["content"]
        if "silk" in prompt:
            return 200, {"error": {"message": "quota exceeded"}}
        return 200, reply("A striped short-sleeved linen shirt with a shirt collar.")

    with FakeChatServer([answer]) as server:
        records = generate_records(task, rows, [], ChatEndpoint(url=server.url, model="m"))
    assert [r.error for r in records] == [None, "generation_failed", None]
    assert "not a chat completion" in records[1].error_message and "quota exceeded" in records[1].error_message
    assert records[0].text.startswith("A striped") and records[0].missing == []
    assert len(server.requests) == 3


def test_generate_columns_are_text_missing_list_and_the_usual_metadata():
    schema = label_schema(load_task("fashion_description"), "desc")
    assert schema.names == ["desc", "desc_missing", "desc_confidence", "desc_provenance", "desc_error"]
    assert schema.field("desc_missing").type == pa.list_(pa.string())
    assert schema.field("desc").metadata == {b"lancetag.kind": b"generate"}


def test_a_generated_row_trains_as_its_filled_prompt_then_its_text():
    task = load_task("fashion_description")
    row = {f"attrs_{k}": v for k, v in SHIRT.items()} | {"desc": "A striped linen shirt."}
    turns = messages_for_row(task, "desc", row)
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]
    assert "- pattern: striped" in turns[1]["content"] and turns[2]["content"] == "A striped linen shirt."


# ----------------------------------------------------------------------------- faithfulness


@pytest.mark.parametrize(
    ("text", "value", "mentioned"),
    [
        ("A linen shirt.", "linen", True),  # present
        ("LINEN, breathable.", "linen", True),  # case and punctuation
        ("A cotton shirt.", "linen", False),  # absent
        ("With short sleeves.", "short_sleeve", True),  # plural, underscore in the value
        ("With a short-sleeve cut.", "short sleeve", True),  # hyphen in the text
        ("A short shirt with long sleeves.", "short sleeve", False),  # partial: the words not together
        ("Sleeve: short.", "short sleeve", False),  # the words in the wrong order
        ("Shirt collars are classic.", "shirt collar", True),  # plural of the last word
        ("A v-neck tee.", "v-neck", True),
        ("Made of linens.", "linen", True),
        ("Linenfold pleats.", "linen", False),  # a word that only starts like the value
        ("A tee.", "t-shirt", False),  # synonyms do not count
    ],
)
def test_a_value_is_mentioned_only_by_its_words_in_order(text, value, mentioned):
    assert mentions(text, value) is mentioned


def test_missing_values_lists_what_the_text_omits_and_ignores_unchecked_values():
    values = {"fabric": "linen", "collar": "none", "pattern": "striped", "sleeve": "short_sleeve", "fit": None}
    text = "A linen shirt with short sleeves."
    assert missing_values(text, values, unchecked=["none", "not applicable"]) == ["striped"]
    assert missing_values(text, values) == ["none", "striped"]
    assert missing_values("A striped linen shirt with short sleeves.", values, unchecked=["none"]) == []


def test_faithfulness_rate_counts_rows_that_omit_a_value_and_skips_rows_not_generated():
    report = faithfulness("desc", [[], ["striped"], None, [], ["striped", "linen"]])
    assert (report.checked, report.unfaithful, report.rate) == (4, 2, 0.5)
    assert report.omitted == {"striped": 2, "linen": 1}


# ----------------------------------------------------------------------------- provenance of inputs


def fashion_table(tmp_path, n: int, rows_per_fragment: int = 4) -> str:
    """An image table whose rows carry fashion attributes under ``attrs`` (as a labeling run writes them)."""
    from tests.table_fixtures import image_rows

    base = image_rows(range(n))
    fabrics = ["linen", "cotton", "denim", "wool"]
    extra = {
        "attrs_category": ["shirt"] * n,
        "attrs_fabric": [fabrics[i % 4] for i in range(n)],
        "attrs_collar": ["shirt collar" if i % 2 else "none" for i in range(n)],
        "attrs_pattern": ["striped" if i % 3 else "solid" for i in range(n)],
        "attrs_sleeve_length": ["short" if i % 2 else "long" for i in range(n)],
        "attrs_provenance": ["tiny-vlm||abc"] * n,
    }
    for name, values in extra.items():
        base = base.append_column(name, pa.array(values, pa.string()))
    uri = str(tmp_path / "shirts.lance")
    lance.write_dataset(base, uri, max_rows_per_file=rows_per_fragment)
    return uri


def test_the_inputs_key_in_sql_equals_the_one_computed_in_python(tmp_path):
    task = load_task("fashion_description")
    uri = fashion_table(tmp_path, 6)
    ds = lance.dataset(uri)
    names = ds.schema.names
    expression = inputs_key_sql(task, names)
    rows = ds.to_table(columns=["id", *task.inputs.values(), "attrs_provenance"]).to_pylist()
    for row in rows:
        key = inputs_key(task, row, names)
        assert key.startswith("tiny-vlm||abc;shirt;")
        found = ds.to_table(columns=["id"], filter=f"id = '{row['id']}' AND {expression} = '{key}'")
        assert found.num_rows == 1


# ----------------------------------------------------------------------------- a real run


def _letters_and_spaces(model) -> dict[str, object]:
    """vLLM extras that make the random tiny model write words (letters and spaces), at least eight tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyzĠ"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {"allowed_token_ids": sorted({i for i in ids if i is not None} | {end}), "min_tokens": 8}


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.vllm
def test_descriptions_from_attributes_on_vllm_are_incremental_flagged_and_redone_when_inputs_change(
    ray_cluster, vllm_openai_server, tiny_qwen2_vl, tmp_path  # noqa: F811
):
    import time

    from ray_jobs.label import LabelOptions, label_table

    task = load_task("fashion_description")
    uri = fashion_table(tmp_path, 12)
    options = LabelOptions(
        task="fashion_description", column="desc", serve=vllm_openai_server, commit_rows=8,
        generate_extra_body=_letters_and_spaces(tiny_qwen2_vl),
    )  # fmt: skip
    started = time.perf_counter()
    first = label_table(uri, options, progress=False)
    seconds = time.perf_counter() - started
    assert (first.planned, first.labeled, first.failed) == (12, 12, 0)
    print(f"\n{first.labeled / seconds:.2f} descriptions/s on the tiny model (run {seconds:.1f} s)")

    ds = lance.dataset(uri)
    rows = ds.to_table().to_pylist()
    for row in rows:
        assert isinstance(row["desc"], str) and row["desc"], row
        assert row["desc_error"] is None
        assert row["desc_provenance"] == f"{SERVED_NAME}||{task.prompt_hash()}|{inputs_key(task, row, ds.schema.names)}"
        values = {k: row[c] for k, c in task.inputs.items() if k in task.checked_inputs}
        assert row["desc_missing"] == missing_values(row["desc"], values, unchecked=task.unchecked_values)
    # random text mentions no attribute: every row is flagged with its checked values (collar "none" is unchecked)
    assert all(row["desc_missing"] for row in rows)

    version = ds.version
    again = label_table(uri, options, progress=False)
    assert (again.planned, again.labeled, again.commits) == (0, 0, 0)
    assert lance.dataset(uri).version == version + 1, "only the run record, no label commit"

    changed = rows[5]["id"]
    lance.dataset(uri).update({"attrs_fabric": "'silk'"}, where=f"id = '{changed}'")
    untouched = label_table(uri, options, progress=False)
    assert untouched.planned == 0, "without --relabel stored text stays"
    redo = label_table(uri, options.model_copy(update={"relabel": True}), progress=False)
    assert (redo.planned, redo.labeled) == (1, 1)
    after = {r["id"]: r for r in lance.dataset(uri).to_table().to_pylist()}
    assert "silk" in after[changed]["desc_provenance"] and "silk" in after[changed]["desc_missing"]

    out = subprocess.run(
        [LANCETAG, "eval", uri, "--column", "desc", "--json"], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(out.stdout)["faithfulness"]
    assert report["checked"] == 12 and report["faithful_rate"] == 0.0
    assert report["omitted"]["striped"] == sum(r["attrs_pattern"] == "striped" for r in rows)


def test_table_faithfulness_reads_the_table_a_batch_at_a_time(tmp_path, monkeypatch):
    """Read 2 rows at a time, a table's report equals the one of its rows' lists (where applied, nulls skipped)."""
    from ray_jobs.evaluation import job
    from ray_jobs.evaluation.faithfulness import table_faithfulness

    missing = [[], ["striped"], None, [], ["striped", "linen"], ["linen"], None]
    uri = str(tmp_path / "d.lance")
    lance.write_dataset(pa.table({"id": [str(i) for i in range(7)], "desc_missing": pa.array(missing, pa.list_(pa.string()))}), uri)
    monkeypatch.setattr(job, "SCAN_BATCH", 2)
    assert table_faithfulness(uri, "desc") == faithfulness("desc", missing)
    report = table_faithfulness(uri, "desc", where="id != '4'")
    assert report == faithfulness("desc", missing[:4] + missing[5:]) and report.omitted == {"striped": 1, "linen": 1}
