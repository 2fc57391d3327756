"""The Mistral Workflow Language v2: the spec model and its parser."""
