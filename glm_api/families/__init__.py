"""Model-family code: how each kind of checkpoint folder is loaded, tokenised and formatted."""
