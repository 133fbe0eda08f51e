"""File format names and versions written by this morphkit (one place to bump them)."""

MODEL_FORMAT = "morphkit.model"
MANIFOLD_FORMAT = "morphkit.manifold"
CHECKPOINT_FORMAT = "morphkit.checkpoint"

FORMAT_VERSIONS = {MODEL_FORMAT: 1, MANIFOLD_FORMAT: 1, CHECKPOINT_FORMAT: 1}

#: What reads each family (for "wrong kind of file" messages).
READERS = {MODEL_FORMAT: "morphkit.load_model()", MANIFOLD_FORMAT: "morphkit.Manifold.load()",
           CHECKPOINT_FORMAT: "morph(..., checkpoint_dir=DIR, resume=True)"}


def format_tag(family: str) -> str:
    """``"morphkit.model/1"`` for the model family, and so on."""
    return f"{family}/{FORMAT_VERSIONS[family]}"
