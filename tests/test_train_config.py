"""Training configs: stage presets, overrides, phase plans, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from jfe.errors import ConfigError
from jfe.train.config import TrainConfig, load_config, parse_overrides
from jfe.train.recipes import STAGE_PRESETS

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_stage_preset_fills_defaults_and_file_wins(tmp_path: Path) -> None:
    path = _write(tmp_path, 'stage = "stage1"\nmodel = "toy-hash"\ndata = "d"\noutput_dir = "o"\n'
                            'hard_negatives = 2\n')
    cfg = load_config(path)
    assert cfg.task_weights == STAGE_PRESETS["stage1"]["task_weights"]
    assert cfg.instructions is False
    assert cfg.hard_negatives == 2  # the file beats the preset
    assert [p.trainable for p in cfg.phases] == ["align", "full"]


def test_overrides_use_dotted_keys_and_toml_literals(tmp_path: Path) -> None:
    path = _write(tmp_path, 'stage = "stage2"\nmodel = "toy-hash"\ndata = "d"\noutput_dir = "o"\n'
                            '[task_weights]\n0 = 1.0\n7 = 1.0\n')
    overrides = parse_overrides(["steps=7", "task_weights.7=3", "lr=1e-3", "output_dir=elsewhere",
                                 "instructions=false"])
    cfg = load_config(path, overrides)
    assert cfg.steps == 7 and cfg.lr == pytest.approx(1e-3) and cfg.instructions is False
    assert cfg.task_weights == {0: 1.0, 7: 3.0}
    assert cfg.output_dir == Path("elsewhere")


def test_phase_plan_covers_the_run() -> None:
    cfg = TrainConfig(model="m", data="d", output_dir="o", steps=10,
                      phases=[{"trainable": "align", "fraction": 0.3}, {"trainable": "full"}])
    assert cfg.phase_plan() == [("align", 0, 3), ("full", 3, 10)]
    cfg = TrainConfig(model="m", data="d", output_dir="o", steps=4,
                      phases=[{"trainable": "align", "steps": 9}, {"trainable": "full"}])
    assert cfg.phase_plan() == [("align", 0, 4)]  # an over-long first phase is cut at the run's end


def test_bad_configs_name_the_problem(tmp_path: Path) -> None:
    path = _write(tmp_path, 'model = "m"\ndata = "d"\noutput_dir = "o"\nbatch_sise = 4\n')
    with pytest.raises(ConfigError, match=r"run\.toml.*batch_sise"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "model = \n"))
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="temperature"):
        load_config({"model": "m", "data": "d", "output_dir": "o", "temperature": 5.0})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("**/*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.steps >= 1 and cfg.phase_plan()[-1][2] == cfg.steps


def test_extends_inherits_and_detects_loops(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('stage = "stage2"\nmodel = "jfe-mini"\ndata = "d"\noutput_dir = "o"\n'
                                        'steps = 77\ninit = "stage1/final"\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nmodel = "two-tower-mini"\ninit = ""\n')
    cfg = load_config(tmp_path / "child.toml")
    assert (cfg.model, cfg.steps, cfg.start_from) == ("two-tower-mini", 77, "two-tower-mini")
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.toml")


def test_glue_parameters_get_their_own_optimizer_groups() -> None:
    import torch

    from jfe.models.jfe_mini import JFEMini, JFEMiniConfig
    from jfe.train.trainer import _glue_ids, _param_groups

    model = JFEMini(JFEMiniConfig(pretrained=False, image_size=64, grid=2))
    glue = _glue_ids(model)
    projector = {id(p) for p in model.projector.parameters()} | {id(model.visual_position)}
    assert projector <= glue and id(model.text.bert.get_input_embeddings().weight) not in glue
    groups = _param_groups(model.named_parameters(), 0.01, glue)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for group in groups:
        assert {id(p) in glue for p in group["params"]} == {group["glue"]}
        assert {p.ndim >= 2 for p in group["params"]} == {group["weight_decay"] > 0}  # no decay on biases, norms
    assert _glue_ids(torch.nn.Linear(2, 2)) == set()  # models without glue: one lr for all
    with pytest.raises(ValueError):
        TrainConfig(model="x", data=Path("d"), output_dir=Path("o"), glue_lr=0)


def test_model_overrides_are_checked_against_the_arch(tmp_path: Path) -> None:
    base = {"model": "jfe-mini", "data": "d", "output_dir": "o"}
    with pytest.raises(ConfigError, match=r"'gird' is not a setting of arch 'jfe-mini'"):
        load_config({**base, "model_overrides": {"gird": 2}})
    with pytest.raises(ConfigError, match=r"arch 'jfe-mini'.*embed_dim"):
        load_config({**base, "model_overrides": {"embed_dim": 128}})  # a known key with a bad value
    with pytest.raises(ConfigError, match=r"'vocab_buckets' is not a setting of arch 'late-fusion-ff-mini'"):
        load_config({**base, "model": "late-fusion-ff-mini-2x2", "model_overrides": {"vocab_buckets": 8}})
    with pytest.raises(ConfigError, match=r"'grid' is not a setting of arch 'toy-hash'"):
        load_config({**base, "model": "toy", "model_overrides": {"grid": 2}})
    assert load_config({**base, "model_overrides": {"grid": 2}}).model_overrides == {"grid": 2}
    # a saved folder is checked against the arch in its config.json
    from jfe.models.toy import ToyEncoder

    saved = ToyEncoder().save_pretrained(tmp_path / "toy")
    with pytest.raises(ConfigError, match=r"'grid' is not a setting of arch 'toy-hash'"):
        load_config({**base, "model": str(saved), "model_overrides": {"grid": 2}})
    # a folder that does not exist yet (stage 1 has not run) is checked when the run starts
    assert load_config({**base, "model": str(tmp_path / "later"), "model_overrides": {"grid": 2}})


def test_init_is_read_as_model_with_a_deprecation_warning() -> None:
    base = {"model": "jfe-mini", "data": "d", "output_dir": "o"}
    with pytest.warns(FutureWarning, match="'init' is deprecated"):
        cfg = load_config({**base, "init": "stage1/final"})
    assert cfg.model == cfg.start_from == "stage1/final" and "init" not in cfg.model_dump()
    assert load_config({**base, "init": ""}).model == "jfe-mini"  # an empty init was always "unset"


def test_shipped_configs_name_registered_models_with_the_2x2_grid() -> None:
    from jfe.models.registry import _MODELS

    for name in ("jfe-mini", "late-fusion-ff-mini"):
        cfg = load_config(REPO / "configs" / f"{name}-stage1.toml")
        assert cfg.model == f"{name}-2x2" and not cfg.model_overrides
        assert _MODELS[cfg.model].config == {"grid": 2} and _MODELS[cfg.model].arch == name
    stage2 = load_config(REPO / "configs" / "jfe-mini-stage2.toml")
    assert stage2.model == "runs/train/jfe-mini/stage1/final" and not stage2.model_overrides
