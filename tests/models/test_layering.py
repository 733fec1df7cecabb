"""models/ is single-device PyTorch: it imports nothing of the trainer, the cluster side,
torch.distributed, ray or deepspeed (so a model runs, and is tested, without any of them)."""

import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"
FORBIDDEN = ("trainer", "cluster", "torch.distributed", "ray", "deepspeed")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_import_nothing_of_the_trainer_cluster_or_distributed_stacks():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) > 5
    for path in files:
        for name in imported_modules(path):
            assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), (path, name)
