"""Nothing PruneScope runs calls out of the machine unless the user says so."""

from __future__ import annotations

import os

HUB_OFFLINE = "HF_HUB_OFFLINE"


def stay_offline() -> None:
    """Keep the Hugging Face libraries off the network in this process: models are read from
    local folders and `hf:NAME` data sets from the local datasets cache. A user who wants
    `datasets` to download sets HF_HUB_OFFLINE=0 themselves (their word wins). Runs before
    huggingface_hub is imported, which reads the variables once."""
    os.environ.setdefault(HUB_OFFLINE, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
