"""Translation between wire protocols and engines; shared by the seed and OpenAI routes."""
