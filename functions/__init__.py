"""The cell's Chalice apps (`keycell.functions`): thin handlers over the core."""
