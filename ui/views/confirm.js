import { html } from "../api.js";

// An in-page confirmation (not window.confirm): says what will happen, then Confirm / Cancel.
export function Confirm({ text, onYes, onNo }) {
  return html`
    <div class="modal-back">
      <div class="modal card" role="dialog" data-testid="confirm">
        <p>${text}</p>
        <div class="row">
          <button onClick=${onYes} data-testid="confirm-yes">Confirm</button>
          <button class="secondary" onClick=${onNo}>Cancel</button>
        </div>
      </div>
    </div>`;
}
