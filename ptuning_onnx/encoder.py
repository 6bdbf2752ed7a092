"""The P-tuning prompt encoder, module for module and key for key ``peft.PromptEncoder``."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType as EncoderType


class PromptEncoder(nn.Module):
    """Maps virtual-token indices to virtual-token embeddings.

    MLP: ``Linear(D,H) ReLU Linear(H,H) ReLU Linear(H,D)`` (always two hidden layers, dropout unused).
    LSTM: bidirectional ``LSTM(D, H, encoder_num_layers)`` then ``Linear(2H,2H) ReLU Linear(2H,D)``.
    With ``inference_mode=True`` only ``embedding`` exists and holds the baked table.

    Input shape: (batch_size, total_virtual_tokens) int64
    Output shape: (batch_size, total_virtual_tokens, token_dim)
    """

    def __init__(self, config: PromptEncoderConfig):
        super().__init__()
        config.require_complete()
        self.token_dim = config.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = config.encoder_hidden_size or config.token_dim
        self.total_virtual_tokens = config.total_virtual_tokens
        self.num_virtual_tokens = config.num_virtual_tokens  # rows prepended; the rest are PEFT's unused rows
        self.encoder_type = config.encoder_reparameterization_type
        self.inference_mode = config.inference_mode

        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if self.inference_mode:
            return
        if self.encoder_type == EncoderType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=self.input_size,
                hidden_size=self.hidden_size,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.hidden_size * 2, self.hidden_size * 2),
                nn.ReLU(),
                nn.Linear(self.hidden_size * 2, self.output_size),
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used.",
                    stacklevel=2,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(self.input_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.hidden_size),
                nn.ReLU(),
                nn.Linear(self.hidden_size, self.output_size),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)  # (B, N, D)
        if self.inference_mode:
            return embeds
        if self.encoder_type == EncoderType.LSTM:
            return self.mlp_head(self.lstm_head(embeds)[0])
        return self.mlp_head(embeds)

    @torch.no_grad()
    def bake(self) -> torch.Tensor:
        """The prompt table (total_virtual_tokens, token_dim), computed in eval mode as PEFT saves it."""
        was_training = self.training
        self.eval()
        try:
            indices = torch.arange(self.total_virtual_tokens, device=self.embedding.weight.device)
            return self(indices.unsqueeze(0))[0].detach().clone()
        finally:
            self.train(was_training)
