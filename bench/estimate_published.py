"""Print lorakit's estimates for the published memory figures compared in docs/hardware.md."""

from lorakit.plan.estimate import estimate, hardware_table


def main() -> None:
    rows = [
        ("QLoRA paper, LLaMA 65B on one 48 GB GPU",
         estimate("llama1-65b", method="qlora", r=64, seq_len=512, grad_checkpointing=True,
                  optimizer="paged_adamw8bit")),
        ("torchtune Llama-2-7B QLoRA (9.3 GB)",
         estimate("llama2-7b", method="qlora", r=8, target_modules=["q_proj", "v_proj"],
                  seq_len=512, batch_size=2, grad_checkpointing=True)),
        ("torchtune Llama-2-7B LoRA (15.6 GB)",
         estimate("llama2-7b", method="lora", r=8, target_modules=["q_proj", "v_proj"],
                  seq_len=512, batch_size=2, grad_checkpointing=True)),
        ("LoRA paper GPT-3 175B full (1.2 TB)",
         estimate("gpt3-175b", method="full", seq_len=2048, grad_checkpointing=True,
                  precision="fp16")),
        ("LoRA paper GPT-3 175B LoRA (350 GB)",
         estimate("gpt3-175b", method="lora", r=4, target_modules=["c_attn"], seq_len=2048,
                  grad_checkpointing=True, precision="fp16")),
    ]
    for label, est in rows:
        print(f"{label}: {est.memory_gib()}")
    for row in hardware_table():
        print(row)


if __name__ == "__main__":
    main()
