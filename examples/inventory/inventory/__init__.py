"""The inventory service of the shop example."""
