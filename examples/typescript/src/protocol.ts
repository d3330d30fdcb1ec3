// The messages of CONTRACT §2, §5 and §6 as TypeScript types. The JSON Schemas in
// docs/schemas/ are the precise definition; these types are what the examples rely on.

/** A turn as producers publish it (turn.schema.json). Unknown fields are passed through. */
export interface Turn {
  messageId: string;
  agentId: string;
  organizationId?: string | null;
  conversationId?: string | null;
  channelId?: string | null;
  userId?: string | null;
  runId?: number | null;
  platform?: string | null;
  platformMetadata?: Record<string, unknown> | null;
  payload?: unknown;
  [field: string]: unknown;
}

/** turnd → worker, one per stdin line (worker-stdin*.schema.json). */
export type StdinLine = { type: "turn"; epoch: number; turn: Turn } | { type: string };

/** worker → turnd, one per stdout line (worker-stdout*.schema.json). */
export type StdoutLine =
  | { type: "reply"; messageId: string; payload?: unknown }
  | { type: "error"; messageId: string; error: string; code?: string }
  | { type: "heartbeat" }
  | { type: "provider_failed"; code: string; reason?: string }
  | { type: "provider_recovered" };

/** The body of a terminal event (terminal-event.schema.json). */
export interface TerminalEvent {
  messageId: string;
  deployment: string;
  organizationId: string | null;
  agentId: string;
  conversationId: string | null;
  kind: "reply" | "error";
  payload: unknown;
  error: { code: string; message: string } | null;
  routing: {
    userId: string | null;
    channelId: string | null;
    platform: string | null;
    platformMetadata: Record<string, unknown> | null;
  };
  createdAt: string;
}
