import os
from pathlib import Path

import pytest

# Tests never touch the network; W&B writes offline run directories only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_EM = Path(os.environ.get("EMSWEEP_SHARED", REPO.parent / "shared")) / "em"


@pytest.fixture(scope="session")
def shared_em() -> Path:
    if not (SHARED_EM / "data" / "insecure.jsonl").exists():
        pytest.fail(f"public EM data not found at {SHARED_EM} (set EMSWEEP_SHARED)")
    return SHARED_EM


@pytest.fixture(scope="session")
def embedded_model() -> str:
    from emsweep.models import resolve_model_path

    return resolve_model_path("embedded:SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def qwen_judge() -> str:
    """The embedded judge (Qwen2.5-Coder-1.5B-Instruct, fetched by `make setup`)."""
    from emsweep.models import resolve_model_path

    return resolve_model_path("embedded:Qwen2.5-Coder-1.5B-Instruct")
