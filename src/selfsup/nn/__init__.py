"""Building blocks shared by the methods: EMA, memory bank, distributed helpers."""
