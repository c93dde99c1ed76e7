"""Named recipes (YAML), installed as package data of `lt2convert.recipes`: `lt2convert plan --recipe NAME`."""
