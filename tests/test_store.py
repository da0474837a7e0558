import json

import pytest

from lm import config, spec as spec_lib
from lm.errors import ConfigError
from lm.store import Store

from sweeps import spec_file


def test_store_accepts_trials_stored_before_a_new_config_key(tmp_path):
    trials = spec_lib.plan(spec_lib.load_spec(spec_file(tmp_path)))
    store = Store(tmp_path / "store.sqlite")
    store.sync(trials)
    old = config.to_dict(trials[0].cfg)
    del old["train"]["spikes"]  # as written by an lm without train.spikes
    store.db.execute("UPDATE trials SET config=? WHERE name=?", (json.dumps(old), trials[0].name))
    store.sync(trials)  # same trials: accepted
    changed = config.replace(trials[0].cfg, train={"steps": 7})
    with pytest.raises(ConfigError, match="another config"):
        store.sync([spec_lib.Trial(trials[0].name, "fit", changed)])
