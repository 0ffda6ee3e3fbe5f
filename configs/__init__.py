"""The shipped config files (installed as `score_sde.configs`): each defines `get_config()`.

They are data, read with `score_sde.config.load_config_file`, not imported; select one with
`python -m score_sde.train --config NAME` (or a path to your own file).
"""
