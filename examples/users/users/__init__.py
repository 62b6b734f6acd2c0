"""The users service of the shop example."""
