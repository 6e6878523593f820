"""Domain, storage and crypto code; nothing here imports Quart."""
