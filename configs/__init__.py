"""Config presets (tiny, bench, bench-small, gpt3-175b), shipped inside the package as
`lm.configs` so that `lm train tiny` works from any directory after `pip install`."""
