"""The serving layer every entry point shares (vLLM's OpenAIServing* in
spirit): one set of request types and limits, and one way from an OpenAI
body to engine inputs and from engine outputs to an OpenAI response or
stream chunk. See openai_serving.OpenAIServing."""
