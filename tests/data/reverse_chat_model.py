import mlflow
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, TokenUsageStats


class ReverseChat(ChatModel):
    """Answers with the last message reversed: a chat model that is not a transformers pipeline."""

    def predict(self, context, messages, params):
        text = messages[-1].content[::-1]
        if params.max_tokens:
            text = text[: params.max_tokens]
        return ChatCompletionResponse(
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=text), finish_reason="stop")],
            usage=TokenUsageStats(prompt_tokens=len(messages), completion_tokens=len(text), total_tokens=len(messages) + len(text)),
            model="reverse",
        )


mlflow.models.set_model(ReverseChat())
