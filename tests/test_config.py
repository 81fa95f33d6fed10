import pytest

from lmstrain.config import load_config, schema_keys, split_seed
from lmstrain.errors import ConfigError


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_only_data_root_is_a_valid_config_with_defaults(tmp_path):
    config = load_config(write(tmp_path, "data:\n  root: brats\n"))
    assert config.data.root == str(tmp_path / "brats")
    assert config.data.shape == [128, 128, 128]
    assert config.train.epochs == 50
    assert config.lms.enabled is False
    assert config.output.name == "exp"
    assert config.output.root == str(tmp_path.cwd() / "runs")


def test_empty_file_is_valid_and_root_unset(tmp_path):
    assert load_config(write(tmp_path, "")).data.root is None


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    path = write(tmp_path, "data:\n  shap: [64, 64, 64]\n")
    with pytest.raises(ConfigError, match=r"^unknown key 'data.shap': did you mean 'data.shape'\?"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian': did you mean 'train'\?"):
        load_config(write(tmp_path, "trian:\n  epochs: 3\n"))


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
    ("train.epochs=0", "train.epochs: must be at least 1, got 0"),
    ("train.epochs=true", "train.epochs: expected an integer, got True"),
    ("train.learning_rate=-1", "train.learning_rate: must be greater than 0.0, got -1.0"),
    ("data.shape=[64,64]", "data.shape: expected 3 values, got [64, 64]"),
    ("data.shape=[64,0,64]", "data.shape: must be at least 1, got [64, 0, 64]"),
    ("model.name=isensee", "model.name: expected one of isensee2017, unet, got 'isensee' "
                           "(did you mean 'isensee2017'?)"),
    ("lms.enabled=maybe", "lms.enabled: expected true or false or one of auto, got 'maybe'"),
    ("lms.device_memory=lots", "lms.device_memory: expected a size such as 16GiB"),
    ("train", "--set expects section.key=value (e.g. train.epochs=3), got 'train'"),
    ("train.learning_rate=.nan", "train.learning_rate: must be a finite number, got nan"),
    ("train.learning_rate=nan", "train.learning_rate: expected a number, got 'nan'"),
    ("data.val_fraction=.nan", "data.val_fraction: must be a finite number, got nan"),
    ("loss.smooth=.inf", "loss.smooth: must be a finite number, got inf"),
    ("lms.device_memory=.inf", "lms.device_memory: must be a finite number, got inf"),
    ("lms.device_memory=.nan", "lms.device_memory: must be a finite number, got nan"),
    ("lms.device_memory=0", "lms.device_memory: must be greater than 0, got 0"),
    ("data.shape=[30,32,32]", "data.shape: [30, 32, 32] does not fit isensee2017 with "
                              "model.depth 5: every edge must be a multiple of 16; 30 is not "
                              "(nearest that work: 16, 32)"),
])
def test_bad_values_name_the_key_and_the_value(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "data: {root: x}\n"), [override])
    assert str(info.value).startswith(message)


def test_set_overrides_parse_yaml_values(tmp_path):
    config = load_config(write(tmp_path, "data: {root: x}\n"),
                         ["data.shape=[32,48,64]", "train.learning_rate=5e-4",
                          "lms.device_memory=16GiB", "lms.enabled=auto", "model.name=unet"])
    assert config.data.shape == [32, 48, 64]
    assert config.train.learning_rate == 5e-4
    assert config.lms.device_memory == 16 * 2**30
    assert config.lms.enabled == "auto"
    assert config.model.name == "unet"


def test_the_split_seed_defaults_to_the_training_seed(tmp_path):
    path = write(tmp_path, "data: {root: x}\ntrain: {seed: 7}\n")
    assert split_seed(load_config(path)) == 7  # runs made before data.split_seed keep their split
    assert split_seed(load_config(path, ["data.split_seed=2"])) == 2
    with pytest.raises(ConfigError, match="data.split_seed"):
        load_config(path, ["data.split_seed=-1"])


def test_yaml_paths_are_relative_to_the_file_and_set_paths_to_the_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, "data:\n  root: ../data\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).data.root == str(tmp_path / "data")
    assert load_config(path, ["data.root=other"]).data.root == str(tmp_path / "other")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_round_trip_through_yaml(tmp_path):
    config = load_config(write(tmp_path, "data: {root: x}\n"), ["train.epochs=7"])
    again = load_config(write(tmp_path, config.to_yaml(), "again.yaml"))
    assert again.to_dict() == config.to_dict()


def test_every_key_has_help():
    keys = list(schema_keys())
    assert len(keys) > 30
    assert all(help_text for _key, _tp, _default, help_text in keys)


def test_swap_settings_are_checked_by_the_config(tmp_path):
    from click.testing import CliRunner

    from lmstrain.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("lms: {swapin_ahead: 0}\n")
    result = CliRunner().invoke(main, ["config", "show", str(path)])
    assert result.exit_code == 2
    assert "lms.swapin_ahead: must be at least 1, got 0" in result.output
    path.write_text("lms: {sync_mode: sometimes}\n")
    assert CliRunner().invoke(main, ["config", "show", str(path)]).exit_code == 2


def test_shape_check_uses_the_configured_depth_and_network(tmp_path):
    path = write(tmp_path, "data: {shape: [24, 36, 8]}\nmodel: {name: unet, depth: 4}\n")
    with pytest.raises(ConfigError, match=r"^data.shape: \[24, 36, 8\] does not fit unet with "
                                          r"model.depth 4: every edge must be a multiple of 8; "
                                          r"36 is not \(nearest that work: 32, 40\)$"):
        load_config(path)
    assert load_config(path, ["data.shape=[24,32,8]"]).data.shape == [24, 32, 8]


def test_autotune_needs_a_positive_budget(tmp_path):
    path = write(tmp_path, "lms: {autotune: true, device_memory: 0}\n")
    with pytest.raises(ConfigError, match="^lms.device_memory: must be greater than 0, got 0"):
        load_config(path)
    assert load_config(path, ["lms.device_memory=16GiB"]).lms.device_memory == 16 * 2**30
    assert load_config(path, ["lms.device_memory=null"]).lms.device_memory is None


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs/run", "", ".", "..", "x/"])
def test_output_name_is_a_single_folder_name(tmp_path, name):
    path = write(tmp_path, "output: {name: " + repr(name) + "}\n")
    with pytest.raises(ConfigError, match=r"^output.name: must be a single folder name "):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^output.name: must be a single folder name "):
        load_config(write(tmp_path, ""), [f"output.name='{name}'"])


def test_output_name_may_be_null_or_a_plain_name(tmp_path):
    assert load_config(write(tmp_path, "output: {name: my-run_2.b}\n")).output.name == "my-run_2.b"
    assert load_config(write(tmp_path, ""), ["output.name=null"]).output.name is None


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("output: {name: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{path} is not UTF-8 text \(byte 0xe9 at offset "
                                          r"18\); save it as UTF-8$"):
        load_config(path)


def test_a_symlink_loop_in_a_path_key_is_named(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = write(tmp_path, "data: {root: loop}\n")
    message = rf"^data.root: cannot resolve {tmp_path / 'loop'}: a symbolic link loop"
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "", "ok.yaml"), [f"data.root={tmp_path / 'loop'}"])


@pytest.mark.parametrize("text, message", [
    ("data: [unclosed\n", "is not valid YAML: line 2, column 1: expected ',' or ']', but got "
                          "'<stream end>' (while parsing a flow sequence)"),
    ("data: !!python/object/apply:os.system ['true']\n",
     "is not valid YAML: line 1, column 7: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
])
def test_yaml_errors_are_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)
