"""A chat model whose library ends the thread that calls it (SystemExit) on any message
containing EXIT, and otherwise answers with the text reversed: a stand-in for a fault that no
per-request handling catches."""

import mlflow
from mlflow.pyfunc import ChatModel
from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, TokenUsageStats


class ExitingChat(ChatModel):
    def predict(self, context, messages, params):
        text = messages[-1].content
        if "EXIT" in text:
            raise SystemExit("the model's library called exit()")
        return ChatCompletionResponse(
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=text[::-1]), finish_reason="stop")],
            usage=TokenUsageStats(prompt_tokens=1, completion_tokens=1, total_tokens=2),
            model="exiting",
        )


mlflow.models.set_model(ExitingChat())
