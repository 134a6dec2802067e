"""The OmegaConf resolvers the Hydra configs use, registered once on import."""

from __future__ import annotations

import secrets

from omegaconf import OmegaConf

# a random suffix keeps two runs started in the same second in different directories (conf/hydra)
OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True, replace=True)
