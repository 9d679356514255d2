"""glm-api: GLM chat and Chinese embedding models behind the GLM-API and OpenAI HTTP APIs."""

__version__ = "0.1.0"
