"""The orders service of the shop example."""
