"""parse_with_config: YAML keys are flag names, the command line wins, mistakes are refused."""

import argparse

import pytest

from dpdiff.config import add_config_argument, apply_config, parse_with_config
from dpdiff.errors import ConfigError


def make_parser(required_model: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", required=required_model)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--format", choices=["imagefolder", "datasets"], default="imagefolder")
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--overwrite", action="store_true")
    return p


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_config():
    args = parse_with_config(make_parser(), [])
    assert (args.seed, args.guidance_scale, args.format, args.prompt, args.overwrite) == (0, 1.0, "imagefolder", None, False)
    assert args.config is None
    assert not any(k.startswith("_dpdiff") for k in vars(args))


def test_yaml_fills_values_and_converts_types(tmp_path):
    cfg = write(tmp_path, "seed: 7\nguidance_scale: 3\nformat: datasets\nprompt: [a cat, a dog]\noverwrite: true\nmodel_dir: out\n")
    args = parse_with_config(make_parser(), ["--config", cfg])
    assert args.seed == 7 and args.guidance_scale == 3.0 and isinstance(args.guidance_scale, float)
    assert args.format == "datasets" and args.prompt == ["a cat", "a dog"] and args.overwrite is True
    assert args.model_dir == "out"


def test_cli_overrides_yaml_even_when_equal_to_default(tmp_path):
    cfg = write(tmp_path, "seed: 7\nprompt: [a cat, a dog]\nguidance_scale: 2.5\n")
    # --seed 0 equals the parser default; it was given explicitly so it must win over the YAML's 7
    args = parse_with_config(make_parser(), ["--seed", "0", "--config", cfg, "--prompt", "a bird"])
    assert args.seed == 0
    assert args.prompt == ["a bird"]  # replaced, not appended to the YAML list
    assert args.guidance_scale == 2.5


def test_unknown_key_is_refused_naming_the_closest_key(tmp_path):
    cfg = write(tmp_path, "seed: 1\nguidance_scal: 10\n")
    with pytest.raises(ConfigError) as e:
        parse_with_config(make_parser(), ["--config", cfg])
    assert "unknown key 'guidance_scal'; did you mean 'guidance_scale'?" in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize(
    "text",
    ["seed: 1.5\n", "seed: true\n", "guidance_scale: high\n", "format: png\n", "overwrite: 1\n", "- seed\n", "seed: [1\n"],
)
def test_bad_values_are_refused(tmp_path, text):
    with pytest.raises(ConfigError):
        parse_with_config(make_parser(), ["--config", write(tmp_path, text)])


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_with_config(make_parser(), ["--config", str(tmp_path / "nope.yaml")])


def test_required_flag_may_come_from_yaml(tmp_path):
    cfg = write(tmp_path, "model_dir: runs/a\n")
    assert parse_with_config(make_parser(required_model=True), ["--config", cfg]).model_dir == "runs/a"
    with pytest.raises(SystemExit):
        parse_with_config(make_parser(required_model=True), [])


def test_subcommand_parsed_elsewhere_then_applied(tmp_path):
    """The `dpdiff sample` path: the CLI parses the namespace, the module's run() applies the YAML."""
    cfg = write(tmp_path, "seed: 9\nguidance_scale: 4.0\n")
    top = argparse.ArgumentParser()
    sub = top.add_subparsers(dest="command")
    sp = sub.add_parser("sample")
    for action in make_parser()._actions[1:]:
        sp._add_action(action)
    add_config_argument(sp)
    args = top.parse_args(["sample", "--config", cfg, "--guidance_scale", "1.0"])
    args = apply_config(sp, args)
    assert args.seed == 9 and args.guidance_scale == 1.0


def test_applying_twice_keeps_cli_precedence(tmp_path):
    """recipes call parse_with_config, then the shared run() applies the config again: a no-op."""
    cfg = write(tmp_path, "seed: 7\nmodel_dir: from_yaml\n")
    parser = make_parser()
    args = parse_with_config(parser, ["--config", cfg, "--model_dir", "from_cli"])
    args = apply_config(parser, args)
    assert args.model_dir == "from_cli" and args.seed == 7


def test_finetune_args_from_python_match_the_command_line(tmp_path):
    from dpdiff.training.arguments import add_finetune_arguments, finetune_args

    flags = dict(method="full", target_epsilon=3, batch_size=128, lora_target_modules=["to_q", "conv1"],
                 output_dir=tmp_path / "out", train_condition_embedder=True, max_steps=None)
    cli = add_finetune_arguments(argparse.ArgumentParser(), method="full").parse_args([
        "--method", "full", "--target_epsilon", "3", "--batch_size", "128", "--lora_target_modules", "to_q", "conv1",
        "--output_dir", str(tmp_path / "out"), "--train_condition_embedder"])
    assert vars(finetune_args(**flags)) == vars(cli)
    with pytest.raises(ConfigError, match="finetune_args: unknown key 'batchsize'"):
        finetune_args(batchsize=4)
    with pytest.raises(ConfigError, match="finetune_args: batch_size must be an integer, got 'many'"):
        finetune_args(batch_size="many")


def test_args_from_dict_refuses_a_missing_required_flag():
    from dpdiff.config import args_from_dict

    with pytest.raises(ConfigError, match="arguments: --model_dir must be set"):
        args_from_dict(make_parser(required_model=True), {})
