"""A chat model that kills its process on any message containing POISON, and otherwise
answers with the text reversed: a stand-in for a request that crashes the GPU worker."""

import os

import mlflow
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, TokenUsageStats


class CrashingChat(ChatModel):
    def predict(self, context, messages, params):
        text = messages[-1].content
        if "POISON" in text:
            os._exit(3)
        return ChatCompletionResponse(
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=text[::-1]), finish_reason="stop")],
            usage=TokenUsageStats(prompt_tokens=1, completion_tokens=1, total_tokens=2),
            model="crashing",
        )


mlflow.models.set_model(CrashingChat())
