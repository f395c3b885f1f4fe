"""Model card, push_bundle and load_vitask(repo id), fully offline: the Hub is intercepted at the
huggingface_hub boundary (HfApi methods, snapshot_download) on a real bundle from a 1-step run."""

import json
import re
import shutil

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from hf_vitask.config import DEFAULT_RDA_WEIGHT
from hf_vitask.data.digits import digits_task, load_digits_dataset
from hf_vitask.hub import (
    IGNORE_PATTERNS,
    bundle_files,
    flatten_metrics,
    load_vitask,
    push_bundle,
    render_model_card,
)

REPO = "me/digits-vitask"
HUB_BASE = "llava-hf/llava-1.5-7b-hf"
SECRET = "hf_secret_token_that_must_not_leak"
BUNDLE_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "exemplar_connector.safetensors",
    "processor_config.json",
    "task.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_config.json",
    "tsm/model.safetensors",
    "tsm/tsm_config.json",
    "vitask_config.json",
    "vitask_processor.json",
}
JUNK = [  # what a training directory also holds; none of it may go up
    "training_args.bin", "pytorch_model.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "notes.pkl",
    "trainer_state.json", ".hidden.json", "tsm/extra.pt", "tsm/.cache.json", "runs/events.out.tfevents.1",
    "runs/log.txt", "checkpoint-1/adapter_model.safetensors", "checkpoint-1/optimizer.pt",
    "checkpoint-1/trainer_state.json", "other/adapter_model.safetensors",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    """A real bundle: tiny llava base saved to disk, 1 VITask stage-1 step with a TSM, save_model."""
    import hf_vitask
    from hf_vitask.models.loading import load_vlm
    from hf_vitask.models.tiny import save_tiny_vlm

    root = tmp_path_factory.mktemp("hub")
    base = save_tiny_vlm(root / "base", "llava")
    model, processor = load_vlm(base)
    args = hf_vitask.VITaskConfig(
        output_dir=str(root / "run"),
        max_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=2,
        hub_token=SECRET,
    )
    trainer = hf_vitask.VITaskTrainer(
        model=model,
        args=args,
        processing_class=processor,
        train_dataset=load_digits_dataset(max_samples=48)["train"],
        task=digits_task(),
        tsm=hf_vitask.TaskSpecificModel("test_resnet", num_classes=10, img_size=32),
    )
    trainer.train()
    trainer.save_model(str(root / "bundle"))
    return root / "bundle"


@pytest.fixture()
def bundle(trained_bundle, tmp_path):
    """A private copy (push_bundle writes README.md and may point the configs at a hub base)."""
    return shutil.copytree(trained_bundle, tmp_path / "bundle")


@pytest.fixture()
def fake_hub(monkeypatch):
    """Record HfApi.create_repo / create_branch / upload_folder calls instead of talking to the Hub."""
    calls = {"create_repo": [], "create_branch": [], "upload_folder": [], "tokens": []}

    def create_repo(self, repo_id, **kwargs):
        calls["tokens"].append(self.token)
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"].append({"repo_id": repo_id, **kwargs})

    def upload_folder(self, **kwargs):
        calls["upload_folder"].append(kwargs)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid="abc123",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def sent_files(upload_kwargs) -> set[str]:
    """What upload_folder would send: the folder listing filtered by the call's allow / ignore patterns."""
    from pathlib import Path

    folder = Path(upload_kwargs["folder_path"])
    listing = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return set(
        filter_repo_objects(
            listing,
            allow_patterns=upload_kwargs.get("allow_patterns"),
            ignore_patterns=upload_kwargs.get("ignore_patterns"),
        )
    )


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, flags=re.S)
    assert match, "the card must open with YAML front matter"
    return yaml.safe_load(match.group(1))


def python_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


# -- push ----------------------------------------------------------------------------------------------
def test_push_bundle_uploads_exactly_the_bundle(bundle, fake_hub):
    for junk in JUNK:
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_bytes(b"junk")
    url = push_bundle(
        bundle,
        REPO,
        private=True,
        revision="v1",
        commit_message="first VITask model",
        token="hf_user_token",
        base_model=HUB_BASE,
    )
    assert url == f"https://huggingface.co/{REPO}/commit/abc123"
    assert fake_hub["create_repo"] == [
        {"repo_id": REPO, "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    assert fake_hub["tokens"] == ["hf_user_token"]
    assert fake_hub["create_branch"] == [
        {"repo_id": REPO, "branch": "v1", "exist_ok": True, "repo_type": "model"}
    ]
    (upload,) = fake_hub["upload_folder"]
    assert upload["repo_id"] == REPO and upload["revision"] == "v1" and upload["repo_type"] == "model"
    assert upload["commit_message"] == "first VITask model"
    assert upload["folder_path"] == str(bundle)

    sent = sent_files(upload)
    assert sent == BUNDLE_FILES
    assert sent == set(bundle_files(bundle))
    weights = [f for f in sent if not f.endswith((".json", ".jinja", ".md"))]
    assert weights and all(f.endswith(".safetensors") for f in weights), weights
    assert not any(
        f.startswith(("checkpoint-", "runs/", "other/")) or "/." in f or f.startswith(".") for f in sent
    )
    for f in sent:  # training_config.json carries the args: the hub token must be redacted
        assert SECRET not in (bundle / f).read_text(errors="ignore"), f
    # the adapter now names the hub base, so load_vitask(REPO) works on another machine
    assert json.loads((bundle / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE
    assert json.loads((bundle / "vitask_config.json").read_text())["base_model_name_or_path"] == HUB_BASE


def test_ignore_patterns_alone_keep_out_non_safetensors_weights(bundle):
    """Second guard: even a caller uploading with our ignore patterns only never sends pickles/state."""
    for junk in JUNK:
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_bytes(b"junk")
    kept = sent_files({"folder_path": str(bundle), "ignore_patterns": list(IGNORE_PATTERNS)})
    assert not [f for f in kept if f.endswith((".bin", ".pt", ".pth", ".pkl")) or f.startswith("checkpoint-")]


def test_push_to_main_defaults(bundle, fake_hub):
    push_bundle(bundle, REPO, base_model=HUB_BASE)
    assert fake_hub["create_repo"][0]["private"] is False
    assert fake_hub["create_branch"] == []
    (upload,) = fake_hub["upload_folder"]
    assert upload["revision"] is None and upload["commit_message"]


def test_push_refuses_a_directory_that_is_not_a_bundle(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError, match="not a VITask bundle"):
        push_bundle(tmp_path, REPO)
    assert fake_hub["create_repo"] == [] and fake_hub["upload_folder"] == []


# -- the model card ---------------------------------------------------------------------------------------
def test_pushed_card_metadata_and_loading_snippet(bundle, fake_hub):
    push_bundle(bundle, REPO, base_model=HUB_BASE, datasets=["me/digits"])
    card = (bundle / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == HUB_BASE
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"hf_vitask", "vitask", "lora", "image-text-to-text", "digits"} <= set(meta["tags"])
    assert meta["datasets"] == ["me/digits"]
    code = python_block(card)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 5 and lines[0] == "from hf_vitask import load_vitask, predict_classes"
    assert f'load_vitask("{REPO}")' in code and "predict_classes(" in code
    compile(code, "card", "exec")
    # what was trained, the VITask config, the layout
    for text in (
        "`digits`",
        "`zero`",
        "stage 1 (EP + RDA)",
        "test_resnet",
        "llava family",
        f"rda_weight: {DEFAULT_RDA_WEIGHT}",
        "ep_weight: 1.0",
        "lora_r: 16",
        "`tsm/model.safetensors`",
        "`exemplar_connector.safetensors`",
    ):
        assert text in card, text
    assert "per_device_eval_batch_size" not in card  # only the VITask fields (+ a short optimisation line)
    assert "No evaluation results" in card


def test_card_reads_eval_results_and_builds_model_index(bundle):
    (bundle / "eval_results.json").write_text(
        json.dumps(
            {
                "eval_loss": 0.5,
                "eval_accuracy": 0.75,
                "eval_runtime": 1.5,
                "epoch": 1.0,
                "eval_samples_per_second": 3,
            }
        )
    )
    card = render_model_card(bundle, repo_id=REPO, base_model=HUB_BASE, datasets="me/digits")
    meta = front_matter(card)
    assert set(meta["metrics"]) == {"accuracy", "loss"}
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["name"] == "me/digits" and result["task"]["name"] == "digits"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"loss": 0.5, "accuracy": 0.75}
    assert "| eval_accuracy | 0.75 |" in card and "runtime" not in card


def test_card_with_nested_metrics_argument_and_no_dataset(bundle):
    results = {  # the shape `hf-vitask evaluate` writes
        "model_path": "x", "split": "test", "num_samples": 20, "tsm": {"accuracy": 0.9},
        "without_tsm/complete": {"num_samples": 20, "likelihood": {"accuracy": 0.8, "macro_f1": 0.7, "auc": 0.95}},
    }  # fmt: skip
    assert flatten_metrics(results) == {
        "tsm/accuracy": 0.9,
        "without_tsm/complete/likelihood/accuracy": 0.8,
        "without_tsm/complete/likelihood/macro_f1": 0.7,
        "without_tsm/complete/likelihood/auc": 0.95,
    }
    card = render_model_card(bundle, base_model=HUB_BASE, metrics=results)
    meta = front_matter(card)
    assert "model-index" not in meta and set(meta["metrics"]) == {"accuracy", "macro_f1", "auc"}
    assert "| without_tsm/complete/likelihood/macro_f1 | 0.7 |" in card


def test_card_leaves_a_local_base_path_out_of_the_metadata(bundle):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a card for a local bundle: nothing to warn about
        card = render_model_card(bundle)
    assert "base_model" not in front_matter(card)
    assert str(bundle) in python_block(card)  # no repo id: the snippet loads the local bundle
    with pytest.warns(
        UserWarning, match="not a Hub repo id"
    ):  # a card for the Hub says what will not work there
        card = render_model_card(bundle, repo_id="me/model")
    assert "base_model" not in front_matter(card)


# -- loading from the Hub --------------------------------------------------------------------------------
def test_load_vitask_from_a_repo_id_runs_the_card_snippet(bundle, fake_hub, monkeypatch, tmp_path):
    """Push (base left as the local tiny dir), then run the card's 5 lines against a faked download."""

    with pytest.warns(UserWarning):
        push_bundle(bundle, REPO, revision="v1")
    downloads = []

    def snapshot_download(repo_id, **kwargs):
        downloads.append({"repo_id": repo_id, **kwargs})
        return str(bundle)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, processor, task = load_vitask(REPO, revision="v1")
    assert downloads[0]["repo_id"] == REPO and downloads[0]["revision"] == "v1"
    assert model.is_peft and model.tsm is not None and model.connector is not None
    assert task.name == "digits" and processor is not None

    load_digits_dataset(max_samples=48)["test"][0]["image"].save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(python_block((bundle / "README.md").read_text()), "card", "exec"), namespace)
    assert namespace["task"].name == "digits" and len(downloads) == 2


def test_load_vitask_rejects_a_missing_local_path(monkeypatch, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    for path in (tmp_path / "missing", "./missing-bundle", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="neither a bundle directory nor"):
            load_vitask(path)


def test_load_vitask_on_a_4bit_base(trained_bundle):
    """QLoRA inference: the bundle's adapter on a base loaded in 4-bit (model_kwargs go to load_vlm)."""
    from hf_vitask.models.loading import bitsandbytes_available, is_quantized

    ok, reason = bitsandbytes_available()
    assert ok, reason  # bitsandbytes (a test dependency) runs 4-bit on CPU too
    model, processor, task = load_vitask(trained_bundle, load_in_4bit=True)
    assert is_quantized(model) and model.is_peft and model.connector is not None
    from hf_vitask import predict_classes
    from hf_vitask.evaluation import score_options

    images = load_digits_dataset(max_samples=48)["test"]["image"][:2]
    full, full_processor, _ = load_vitask(trained_bundle)
    for use_tsm in (False, True):
        scores = score_options(model, processor, task, images, use_tsm=use_tsm)
        assert predict_classes(model, processor, task, images, use_tsm=use_tsm) == scores.argmax(-1).tolist()
        # the same model up to 4-bit rounding: its option scores follow the full-precision bundle's (r = 0.99)
        reference = score_options(full, full_processor, task, images, use_tsm=use_tsm)
        assert torch.corrcoef(torch.stack([scores.flatten(), reference.flatten()]))[0, 1] > 0.9
        assert not torch.equal(scores, reference)


def test_card_of_a_multi_task_bundle(bundle):
    from hf_vitask.task import TaskSpec

    (bundle / "task.json").unlink()
    tasks = [digits_task(), TaskSpec(class_names=["normal", "pneumonia"], name="cxr")]
    (bundle / "tasks.json").write_text(json.dumps([t.to_dict() for t in tasks]))
    card = render_model_card(bundle, repo_id=REPO, base_model=HUB_BASE)
    assert {"digits", "cxr", "hf_vitask"} <= set(front_matter(card)["tags"])
    assert "2 tasks in `tasks.json`" in card and "returns `task` as a list" in card
    assert "tasks.json" in bundle_files(bundle)
    loaded = load_vitask(bundle).task  # every task, in the order of tasks.json
    assert [t.to_dict() for t in loaded] == [t.to_dict() for t in tasks]


def test_trainer_push_to_hub_uploads_the_bundle(tmp_path, fake_hub):
    import hf_vitask
    from hf_vitask.models.tiny import build_tiny_vlm

    model, processor = build_tiny_vlm("llava")
    args = hf_vitask.VITaskConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        report_to="none",
        save_strategy="no",
        ep_weight=0,
        rda_weight=0,
        per_device_train_batch_size=2,
        hub_model_id="me/vitask-digits",
        hub_private_repo=True,
    )
    trainer = hf_vitask.VITaskTrainer(
        model=model,
        args=args,
        processing_class=processor,
        train_dataset=load_digits_dataset(max_samples=48)["train"],
        task=digits_task(),
    )
    trainer.train()
    url = trainer.push_to_hub(revision="v1")
    assert url.endswith("abc123")
    assert (
        fake_hub["create_repo"][0]["repo_id"] == "me/vitask-digits"
        and fake_hub["create_repo"][0]["private"] is True
    )
    upload = fake_hub["upload_folder"][0]
    assert upload["revision"] == "v1"
    sent = sent_files(upload)
    assert {"adapter_model.safetensors", "task.json", "README.md"} <= sent
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in sent)


def test_cli_push(bundle, fake_hub, tmp_path):
    from hf_vitask.cli import main

    assert (
        main(
            [
                "push",
                "--model_path",
                str(bundle),
                "--hub_model_id",
                "me/from-cli",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert fake_hub["create_repo"][0]["repo_id"] == "me/from-cli"
    assert "README.md" in sent_files(fake_hub["upload_folder"][0])
    with pytest.raises(ValueError, match="hub_model_id"):
        main(["push", "--model_path", str(bundle), "--output_dir", str(tmp_path), "--debug"])


def test_export_merged_is_a_plain_model(trained_bundle, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_vitask.hub import export_merged
    from hf_vitask.models.modeling import VITaskModel

    out = export_merged(trained_bundle, tmp_path / "merged")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert "adapter_config.json" not in files
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    adapter = VITaskModel.from_pretrained(trained_bundle, load_tsm=False).eval()

    image = load_digits_dataset(max_samples=48)["test"][0]["image"]
    from hf_vitask.data.collator import build_prompts

    batch = build_prompts(processor, digits_task(), [image])
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapter(**batch).logits, atol=1e-4)
